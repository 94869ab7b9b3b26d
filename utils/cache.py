"""Where semcorr keeps converted weights and materialised default models."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$SEMCORR_CACHE`` if set, else the platform user cache directory (``~/.cache/semcorr``)."""
    override = os.environ.get("SEMCORR_CACHE")
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_cache_dir("semcorr"))
