"""Hugging Face Space entry point: the evaluate metric widget for PCK."""

from pathlib import Path

import evaluate
from evaluate.utils import launch_gradio_widget

if __name__ == "__main__":
    module = evaluate.load(str(Path(__file__).resolve().parent))
    launch_gradio_widget(module)
