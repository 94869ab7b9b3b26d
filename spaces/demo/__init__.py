"""The semcorr demo Space (Gradio): click points on one image and see their matches on another.

``semcorr.spaces.demo.app`` holds the page (:func:`~semcorr.spaces.demo.app.build_demo`) and needs
gradio (``pip install "semcorr[demo]"``); ``semcorr.spaces.demo.engine`` holds what it computes and
needs only semcorr. Serve it with ``semcorr space`` or ``python spaces/demo/app.py``.
"""
