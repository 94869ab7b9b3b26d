"""The ``semantic-correspondence`` pipeline, match drawing and the ``semcorr`` command line.

Importing this module registers the task with transformers, so
``pipeline("semantic-correspondence")`` gives the embedded default model (offline) and
``pipeline("semantic-correspondence", model=<dir or hub id>)`` loads any semcorr model.

The import itself is light: nothing here imports torch or transformers, because the ``semcorr``
console script (``semcorr.pipelines.cli:main``) imports this package before it parses its
arguments, and ``semcorr --help`` or a usage error must not wait for them. The registration runs
as soon as transformers' pipelines are needed: at once when ``transformers.pipelines`` is already
imported, otherwise right after its import (a one-shot import hook), and in any case when
:class:`SemanticCorrespondencePipeline`, :func:`draw_matches` or :func:`default_pipeline` is used.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import threading

TASK = "semantic-correspondence"

_LAZY = {"SemanticCorrespondencePipeline": ".semantic_correspondence", "draw_matches": ".drawing"}
_TRANSFORMERS_PIPELINES = "transformers.pipelines"
_lock = threading.RLock()
_registered = False


def __getattr__(name):  # PEP 562: the heavy names are imported on first use
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        if name == "SemanticCorrespondencePipeline":
            register_task()
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_task() -> None:
    """Register ``semantic-correspondence`` with transformers' pipeline registry (once; imports transformers)."""
    global _registered
    with _lock:
        if _registered:
            return
        from collections.abc import Mapping

        from transformers import AutoModel
        from transformers.pipelines import PIPELINE_REGISTRY

        import semcorr.modeling  # noqa: F401  (registers the Auto classes)

        from .semantic_correspondence import SemanticCorrespondencePipeline

        class _EmbeddedDefault(Mapping):
            """Task default that materialises the embedded model on first use, not at registration."""

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
        _registered = True
        _remove_hook()


def default_pipeline(**kwargs):
    """``pipeline("semantic-correspondence")`` with the embedded default model (no warning)."""
    register_task()
    from transformers import pipeline

    from semcorr.modeling import default_model_dir

    kwargs.setdefault("model", str(default_model_dir()))
    return pipeline(TASK, **kwargs)


class _RegisteringLoader(importlib.abc.Loader):
    """Wraps the loader of ``transformers.pipelines``: runs it, then registers the task."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        register_task()

    def __getattr__(self, name):  # get_source, get_filename, resource readers, ...
        return getattr(self._loader, name)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Hands ``transformers.pipelines`` to :class:`_RegisteringLoader`; leaves once the task is registered."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TRANSFORMERS_PIPELINES:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


_HOOK = _RegisterAfterImport()


def _remove_hook() -> None:
    try:
        sys.meta_path.remove(_HOOK)
    except ValueError:
        pass


if _TRANSFORMERS_PIPELINES in sys.modules:
    register_task()
else:
    sys.meta_path.insert(0, _HOOK)


__all__ = ["SemanticCorrespondencePipeline", "TASK", "default_pipeline", "draw_matches", "register_task"]
