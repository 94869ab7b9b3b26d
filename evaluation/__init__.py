"""PCK of any semcorr model on PF-PASCAL, PF-WILLOW, SPair-71k or your own keypoint pairs.

A library layer: it needs the models (:mod:`semcorr.modeling`), the data (:mod:`semcorr.hub_datasets`)
and the metric (:mod:`semcorr.spaces.pck`), never the pipelines or the command line, so training
code can evaluate without depending on the CLI. ``semcorr evaluate`` is a thin front end to it.

Python::

    from semcorr.evaluation import evaluate_model, format_table
    result = evaluate_model(None, "spair-71k", "/data/SPair-71k")     # None: the embedded model
    result["total"]["pck@0.1"], result["per_category"]["cat"]["pck@0.1"]
    print(format_table(result))

Layout: :mod:`.protocols` (which PCK convention, which frame), :mod:`.runner` (matching and
scoring), :mod:`.report` (the table).
"""

from .protocols import DEFAULT_ALPHAS, FRAMES, PROTOCOL_FRAMES, SIDES, check_alphas, resolve_settings, to_frame
from .report import format_table
from .runner import evaluate_dataset, evaluate_model

__all__ = [
    "DEFAULT_ALPHAS",
    "FRAMES",
    "PROTOCOL_FRAMES",
    "SIDES",
    "check_alphas",
    "evaluate_dataset",
    "evaluate_model",
    "format_table",
    "resolve_settings",
    "to_frame",
]
