"""Hugging Face Spaces shipped with semcorr: `pck` (the evaluate metric) and `demo` (Gradio)."""
