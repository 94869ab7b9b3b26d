"""The ``semantic-correspondence`` pipeline, match drawing and the ``semcorr`` command line.

Importing this module registers the task with transformers, so
``pipeline("semantic-correspondence")`` gives the embedded default model (offline) and
``pipeline("semantic-correspondence", model=<dir or hub id>)`` loads any semcorr model.
"""

from __future__ import annotations

from collections.abc import Mapping

from transformers import AutoModel, pipeline
from transformers.pipelines import PIPELINE_REGISTRY

import semcorr.modeling  # noqa: F401  (registers the Auto classes)

from .drawing import draw_matches
from .semantic_correspondence import SemanticCorrespondencePipeline

TASK = "semantic-correspondence"


class _EmbeddedDefault(Mapping):
    """Task default that materialises the embedded model on first use, not at import time."""

    def __getitem__(self, key):
        if key != "model":
            raise KeyError(key)
        from semcorr.modeling import default_model_dir

        return str(default_model_dir()), None

    def __iter__(self):
        return iter(["model"])

    def __len__(self):
        return 1


PIPELINE_REGISTRY.register_pipeline(
    TASK, pipeline_class=SemanticCorrespondencePipeline, pt_model=AutoModel, type="multimodal"
)
PIPELINE_REGISTRY.supported_tasks[TASK]["default"] = _EmbeddedDefault()


def default_pipeline(**kwargs) -> SemanticCorrespondencePipeline:
    """``pipeline("semantic-correspondence")`` with the embedded default model (no warning)."""
    from semcorr.modeling import default_model_dir

    kwargs.setdefault("model", str(default_model_dir()))
    return pipeline(TASK, **kwargs)


__all__ = ["SemanticCorrespondencePipeline", "TASK", "default_pipeline", "draw_matches"]
