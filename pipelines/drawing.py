"""Pictures of matches: the two images side by side, one line per match, coloured by score."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from semcorr.modeling.image_io import load_image

# Low -> high score: red, orange, yellow, green (readable on photos, and for red-green colour
# blindness the brightness still rises with the score).
_STOPS = np.array([[215, 48, 39], [252, 141, 89], [254, 224, 139], [26, 152, 80]], dtype=np.float64)


def score_color(score: float) -> tuple[int, int, int]:
    """RGB colour of a score in ``[0, 1]``."""
    position = float(np.clip(score, 0.0, 1.0)) * (len(_STOPS) - 1)
    low = int(np.floor(position))
    high = min(low + 1, len(_STOPS) - 1)
    mix = position - low
    return tuple(int(round(v)) for v in (1 - mix) * _STOPS[low] + mix * _STOPS[high])


def draw_matches(source, target, result: dict, max_height: int = 480, line_width: int = 2, colors=None) -> Image.Image:
    """Draw ``result`` (a pipeline output) between the two images.

    Args:
        source, target: the images (paths, PIL images or arrays) the result refers to.
        result: ``{"source_keypoints": [[x, y], ...], "target_keypoints": [...], "scores": [...]}``.
        max_height: both images are scaled to this height (or their own height if smaller).
        colors: optional list of RGB tuples, one per match, overriding the score colours.

    Returns:
        An RGB PIL image: source on the left, target on the right, lines from each source point
        to its match.
    """
    source, target = load_image(source), load_image(target)
    height = min(max_height, max(source.height, target.height))
    scale_source, scale_target = height / source.height, height / target.height
    left = source.resize((max(1, round(source.width * scale_source)), height), Image.BILINEAR)
    right = target.resize((max(1, round(target.width * scale_target)), height), Image.BILINEAR)
    canvas = Image.new("RGB", (left.width + right.width, height), "white")
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width, 0))
    draw = ImageDraw.Draw(canvas)

    source_points = np.asarray(result.get("source_keypoints", []), dtype=np.float64).reshape(-1, 2) * scale_source
    target_points = np.asarray(result.get("target_keypoints", []), dtype=np.float64).reshape(-1, 2) * scale_target
    if len(source_points) != len(target_points):
        raise ValueError(f"{len(source_points)} source keypoints but {len(target_points)} target keypoints")
    scores = np.asarray(result.get("scores", np.ones(len(source_points))), dtype=np.float64).reshape(-1)
    if colors is None:
        colors = [score_color(score) for score in scores]
    radius = max(2, line_width + 1)
    order = np.argsort(scores)  # draw the best matches last, on top
    for index in order:
        (sx, sy), (tx, ty), color = source_points[index], target_points[index], tuple(colors[index])
        tx += left.width
        draw.line([(sx, sy), (tx, ty)], fill=color, width=line_width)
        for x, y in ((sx, sy), (tx, ty)):
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color, outline="white")
    return canvas
