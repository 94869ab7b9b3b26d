"""Pictures of matches: the two images side by side, one line per match, coloured by score; and saving them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from semcorr.modeling.image_io import load_image
from semcorr.utils import atomic_save

CAPTION_HEIGHT = 30  # pixels of the caption band above a stacked panel

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


#: Longest side of a match picture, whatever the images' aspect ratios.
MAX_CANVAS_SIDE = 4096
#: Fewest pixels an image gets on a match picture, across and down (a 10000 x 1 strip stays visible).
MIN_PANEL_SIDE = 8
#: Least height the pair is shrunk to, to keep a very wide pair undistorted, before wide images are squeezed.
_MIN_SHRUNK_HEIGHT = 64


def panel_sizes(source_size, target_size, max_height: int = 480) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((width, height), (width, height))`` of the source and target on a match picture.

    Both images get one height -- the taller one's, at most ``max_height`` -- and keep their
    aspect ratio while the picture fits in :data:`MAX_CANVAS_SIDE` x :data:`MAX_CANVAS_SIDE`. A
    pair too wide for that is drawn lower when 64 pixels or more remain; otherwise (a 10000 x 1
    strip) the wider image is squeezed horizontally into what the other leaves. No image is drawn
    less than :data:`MIN_PANEL_SIDE` pixels across or down.

    Args:
        source_size, target_size: ``(width, height)`` of the images.
    """
    (source_w, source_h), (target_w, target_h) = source_size, target_size
    height = int(min(max(int(max_height), 1), max(source_h, target_h), MAX_CANVAS_SIDE))
    height = max(height, MIN_PANEL_SIDE)
    natural = source_w * height / source_h + target_w * height / target_h
    fitted = int(height * MAX_CANVAS_SIDE / natural)
    if natural > MAX_CANVAS_SIDE and fitted >= min(height, _MIN_SHRUNK_HEIGHT):  # lower the pair, undistorted
        height = max(fitted, MIN_PANEL_SIDE)
    widths = [max(MIN_PANEL_SIDE, round(w * height / h)) for w, h in ((source_w, source_h), (target_w, target_h))]
    if sum(widths) > MAX_CANVAS_SIDE:  # still too wide: squeeze the wider image into what the other leaves
        narrow = min(range(2), key=lambda i: widths[i])
        widths[narrow] = min(widths[narrow], MAX_CANVAS_SIDE // 2)
        widths[1 - narrow] = MAX_CANVAS_SIDE - widths[narrow]
    return (widths[0], height), (widths[1], height)


def draw_matches(source, target, result: dict, max_height: int = 480, line_width: int = 2, colors=None) -> Image.Image:
    """Draw ``result`` (a pipeline output) between the two images.

    Args:
        source, target: the images (paths, PIL images or arrays) the result refers to.
        result: ``{"source_keypoints": [[x, y], ...], "target_keypoints": [...], "scores": [...]}``.
        max_height: both images are scaled to this height (or their own height if smaller); the
            picture never exceeds :data:`MAX_CANVAS_SIDE` on either side, however thin or wide the
            images (see :func:`panel_sizes`).
        colors: optional list of RGB tuples, one per match, overriding the score colours.

    Returns:
        An RGB PIL image: source on the left, target on the right, lines from each source point
        to its match (each point where it lies on its image, whatever the scaling).
    """
    source, target = load_image(source), load_image(target)
    (left_w, height), (right_w, _) = panel_sizes(source.size, target.size, max_height)
    left = source.resize((left_w, height), Image.BILINEAR, reducing_gap=3.0)
    right = target.resize((right_w, height), Image.BILINEAR, reducing_gap=3.0)
    scale_source = np.array([left_w / source.width, height / source.height])
    scale_target = np.array([right_w / target.width, height / target.height])
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


def font(size: int):
    """Pillow's default font at ``size`` pixels (one bitmap size before Pillow 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def stack_panels(panels: list[tuple[str, Image.Image]]) -> tuple[Image.Image, list[int]]:
    """Pictures stacked top to bottom, each under a caption band of :data:`CAPTION_HEIGHT` pixels.

    Returns ``(canvas, tops)``: the white canvas as wide as the widest picture, and the row at which
    each picture starts (to move points drawn on a picture into the canvas).
    """
    caption_font = font(16)
    text_width = max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=caption_font)) + 16
                     for text, _ in panels)
    width = max(text_width, *(picture.width for _, picture in panels))
    canvas = Image.new("RGB", (width, sum(CAPTION_HEIGHT + picture.height for _, picture in panels)), "white")
    draw, top, tops = ImageDraw.Draw(canvas), 0, []
    for text, picture in panels:
        draw.text((8, top + CAPTION_HEIGHT // 2), text, fill=(30, 30, 30), font=caption_font, anchor="lm")
        top += CAPTION_HEIGHT
        canvas.paste(picture, (0, top))
        tops.append(top)
        top += picture.height
    return canvas, tops


def save_image(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write ``image`` to ``path`` atomically, in the format its extension names (PNG when it names none).

    Returns ``path``; the file gets ordinary permissions (``0o666`` minus the umask).
    """
    image_format = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    return atomic_save(path, lambda temporary: image.save(temporary, format=image_format))
