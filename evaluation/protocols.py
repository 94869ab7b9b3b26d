"""The PCK settings of a run: a published protocol (or the metric defaults), explicit values, the frame.

Frames. PCK is measured in original pixels by default (``frame="original"``); every threshold
but ``"bbox-kp-padded"`` is then equal to what an isotropically resizing codebase measures.
``frame="protocol"`` measures after the anisotropic square resize the DHPF (Min et al., ECCV 2020),
CHM (Min & Cho, CVPR 2021) -- 240 x 240 -- and CATs (Cho et al., NeurIPS 2021) / VAT (Hong et al.,
ECCV 2022) -- 256 x 256 -- codebases apply, which is what their PF-WILLOW numbers depend on.
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_ALPHAS = (0.05, 0.1, 0.15)
FRAMES = ("original", "protocol")
SIDES = ("target", "source")
#: (height, width) each codebase squashes images to before measuring; protocols not listed resize
#: isotropically (or not at all), which leaves their thresholds unchanged.
PROTOCOL_FRAMES = {"dhpf": (240, 240), "chm": (240, 240), "cats": (256, 256), "vat": (256, 256)}


def resolve_settings(protocol, benchmark, threshold=None, average=None, comparison=None, padding_value=None,
                     side=None, frame="original") -> dict:
    """The PCK settings of a run: a protocol preset (or the metric defaults) plus explicit values.

    Returns ``{"protocol", "threshold", "average", "comparison", "padding_value", "side", "frame",
    "frame_size"}``; ``frame_size`` is ``[h, w]`` of the square frame or None for original pixels.

    Raises:
        ValueError: an unknown protocol, side or frame, or an explicit value contradicting the protocol.
    """
    from semcorr.spaces.pck import PROTOCOLS, resolve_config

    if protocol is not None and protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid values: {[*PROTOCOLS]}")
    config = resolve_config(protocol, benchmark, threshold, average, comparison, padding_value)
    preset_side = PROTOCOLS[protocol]["side"] if protocol is not None else "target"
    if side is not None and side not in SIDES:
        raise ValueError(f"unknown side {side!r}; valid values: {list(SIDES)}")
    if protocol is not None and side is not None and side != preset_side:
        raise ValueError(f"side={side!r} contradicts protocol={protocol!r}, which judges on the {preset_side}; drop one")
    if frame not in FRAMES:
        raise ValueError(f"unknown frame {frame!r}; valid values: {list(FRAMES)}")
    frame_size = PROTOCOL_FRAMES.get(protocol) if frame == "protocol" else None
    return {"protocol": protocol, **config, "side": side or preset_side, "frame": frame,
            "frame_size": list(frame_size) if frame_size else None}


def check_alphas(alphas) -> tuple[float, ...]:
    """``alphas`` (one number or a list) as a tuple of distinct positive floats; ValueError otherwise."""
    try:
        values = tuple(float(a) for a in (alphas if isinstance(alphas, (list, tuple)) else [alphas]))
    except (TypeError, ValueError):
        raise ValueError(f"alphas must be positive numbers, got {alphas!r}") from None
    if not values or not all(math.isfinite(a) and a > 0 for a in values):
        raise ValueError(f"alphas must be a non-empty list of positive numbers, got {list(alphas)!r}")
    if len({f"{a:g}" for a in values}) != len(values):  # the report keys are pck@<alpha:g>
        raise ValueError(f"alphas must be distinct, got {list(values)!r}")
    return values


def to_frame(predicted: np.ndarray, reference: np.ndarray, size, box, frame_size):
    """Scale one pair's judged-image quantities into an anisotropic ``frame_size = (h, w)`` frame.

    Args:
        predicted, reference: ``(N, 2)`` (x, y) original pixels.
        size: ``(h, w)`` of the judged image; box: ``(x1, y1, x2, y2)``.

    Returns:
        ``(predicted, reference, size, box)`` in frame pixels.
    """
    height, width = size
    scale = np.array([frame_size[1] / width, frame_size[0] / height])
    box = [box[0] * scale[0], box[1] * scale[1], box[2] * scale[0], box[3] * scale[1]]
    return predicted * scale, reference * scale, [float(frame_size[0]), float(frame_size[1])], box
