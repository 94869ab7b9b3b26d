"""PCK metric for semantic correspondence (an `evaluate` metric laid out as a Space)."""

from .pck import PCK, PROTOCOLS, compute_pck, resolve_config

__all__ = ["PCK", "PROTOCOLS", "compute_pck", "resolve_config"]
