"""Benchmark builders (PF-PASCAL, PF-WILLOW, SPair-71k), their Hub layout, one loader for "a benchmark or a
dataset" (:func:`load_pairs`), SC-ImageNet (:func:`load_sc_imagenet`; :mod:`.sc_imagenet`), and the real image
pairs that installed packages ship."""

from ._common import BenchmarkConfig, BenchmarkLayoutError
from .benchmarks import BENCHMARKS, benchmark_builder, canonical_benchmark_name, load_benchmark, to_hub_layout
from .pf_pascal import PFPascal
from .pf_willow import PFWillow
from .sc_imagenet import load_sc_imagenet
from .sources import PAIR_COLUMNS, load_pairs, open_dataset
from .spair import SPair71k, SPairConfig

__all__ = [
    "BENCHMARKS",
    "BenchmarkConfig",
    "BenchmarkLayoutError",
    "PAIR_COLUMNS",
    "PFPascal",
    "PFWillow",
    "SPair71k",
    "SPairConfig",
    "benchmark_builder",
    "canonical_benchmark_name",
    "load_benchmark",
    "load_pairs",
    "load_sc_imagenet",
    "open_dataset",
    "to_hub_layout",
]
