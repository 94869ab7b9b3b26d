"""Benchmark builders (PF-PASCAL, PF-WILLOW, SPair-71k), their Hub layout, and the real image pairs that installed packages ship."""

from ._common import BenchmarkConfig, BenchmarkLayoutError
from .benchmarks import BENCHMARKS, benchmark_builder, load_benchmark, to_hub_layout
from .pf_pascal import PFPascal
from .pf_willow import PFWillow
from .spair import SPair71k, SPairConfig

__all__ = [
    "BENCHMARKS",
    "BenchmarkConfig",
    "BenchmarkLayoutError",
    "PFPascal",
    "PFWillow",
    "SPair71k",
    "SPairConfig",
    "benchmark_builder",
    "load_benchmark",
    "to_hub_layout",
]
