"""What the demo Space computes, without any Gradio: images, models, cached pair sessions, pictures.

The Space answers a click in milliseconds because the expensive part of matching -- the dense
fields of a pair (:meth:`PairSession.dense`) -- is computed once per pair and model and kept in a
small LRU cache; a click only carries its points through the kept field. That shortcut is exact
for :class:`~semcorr.modeling.HyperpixelFlowModel` (the embedded default): it runs the same ops
``HyperpixelFlowModel.match`` runs on keypoints, and ``tests/test_demo_space.py`` checks it against
``pipeline("semantic-correspondence")``. Any other model transfers its points through the
pipeline itself, one full match per click.

Coordinates are the package's everywhere: ``(x, y)`` in pixels of the *original* image, origin at
the top-left corner, pixel ``i`` spanning ``[i, i+1)``. Images whose longer side exceeds
:data:`MAX_SIDE` are downscaled for matching and drawing ("working" images); points are mapped to
the working image and back, so nothing a caller sees depends on it.
"""

from __future__ import annotations

import atexit
import hashlib
import inspect
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

#: Images are matched and drawn with their longer side at most this many pixels.
MAX_SIDE = 1024
#: Uploads with more pixels than this are refused (before they are decoded).
MAX_PIXELS = 40_000_000
#: At most this many clicked points per pair.
MAX_POINTS = 32
#: The auto mode asks the pipeline for this many matches once and shows the best ``k`` of them
#: (the pipeline returns its matches sorted by score, so the first ``k`` of a longer list are its top ``k``).
TOP_K_MAX = 200
#: Label of the embedded default model in the model menu.
DEFAULT_MODEL = "embedded default (Hyperpixel Flow on EfficientNet-Lite0)"
#: Height of the side-by-side pictures.
VIEW_HEIGHT = 420

#: One colour per clicked point (cycled): Tableau 10, distinct on photos.
POINT_COLORS = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)
#: Heat map colours, low -> high (a perceptual dark-to-bright ramp, like matplotlib's "inferno").
_HEAT_STOPS = np.array(
    [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [250, 193, 39], [252, 255, 164]],
    dtype=np.float64,
)


def point_color(index: int) -> tuple[int, int, int]:
    return POINT_COLORS[index % len(POINT_COLORS)]


# -- images -----------------------------------------------------------------------------------------
@dataclass
class DemoImage:
    """An image as the Space uses it.

    Attributes:
        image: the working RGB image (the original, downscaled so its longer side is at most :data:`MAX_SIDE`).
        original_size: ``(width, height)`` of the original (EXIF orientation applied).
        name: the file name shown to the user.
        digest: hash of the working pixels (the cache key of the pair).
    """

    image: Image.Image
    original_size: tuple[int, int]
    name: str
    digest: str

    @property
    def scale(self) -> np.ndarray:
        """``(sx, sy)``: original pixels per working pixel."""
        return np.array([self.original_size[0] / self.image.width, self.original_size[1] / self.image.height])

    def to_working(self, points) -> np.ndarray:
        return np.asarray(points, dtype=np.float64).reshape(-1, 2) / self.scale

    def to_original(self, points) -> np.ndarray:
        return np.asarray(points, dtype=np.float64).reshape(-1, 2) * self.scale


def check_image_file(path, name: str | None = None) -> tuple[int, int]:
    """``(width, height)`` of the image file ``path``; ``ValueError`` with a visitor-readable message if it is none.

    Reads only the header: a file that is not an image, or one larger than :data:`MAX_PIXELS`, is
    refused before it is decoded.
    """
    name = name or Path(path).name
    try:
        with Image.open(path) as image:
            size = image.size
    except Image.DecompressionBombError:
        raise ValueError(f"{name!r} is too large to open here; upload an image of at most {MAX_PIXELS // 1_000_000} megapixels") from None
    except (OSError, ValueError, SyntaxError):
        raise ValueError(f"{name!r} is not an image this demo can read; upload a PNG, JPEG, WebP, BMP or TIFF image") from None
    if size[0] * size[1] > MAX_PIXELS:
        raise ValueError(f"{name!r} is {size[0]}x{size[1]} pixels; upload an image of at most {MAX_PIXELS // 1_000_000} megapixels")
    return size


#: At most one heavy computation (a pair's dense field or score volume, a pipeline call) at a time in
#: this process, whichever event asks for it: clicks answered from the cache do not wait for it.
COMPUTE = threading.Semaphore(1)

_image_cache: OrderedDict = OrderedDict()
_image_lock = threading.Lock()


def open_image(source, name: str | None = None) -> DemoImage:
    """A path, PIL image or array as a :class:`DemoImage` (paths are cached by path, size and mtime)."""
    from semcorr.modeling import load_image

    key = None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = name or path.name
        try:
            stat = path.stat()
        except OSError:
            raise ValueError(f"image {name!r} could not be read; upload it again") from None
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with _image_lock:
            if key in _image_cache:
                _image_cache.move_to_end(key)
                return _image_cache[key]
        check_image_file(path, name)
    image = load_image(source)  # RGB, EXIF orientation applied; ValueError naming the problem
    original_size = image.size
    if image.width * image.height > MAX_PIXELS:
        raise ValueError(f"image {name or ''} is {image.width}x{image.height} pixels; the limit is {MAX_PIXELS // 1_000_000} megapixels")
    if max(image.size) > MAX_SIDE:
        factor = MAX_SIDE / max(image.size)
        image = image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))), Image.BICUBIC, reducing_gap=3.0)
    digest = hashlib.sha1(image.tobytes() + repr(original_size).encode()).hexdigest()[:16]
    result = DemoImage(image, original_size, name or "image", digest)
    if key is not None:
        with _image_lock:
            _image_cache[key] = result
            while len(_image_cache) > 8:
                _image_cache.popitem(last=False)
    return result


# -- models -----------------------------------------------------------------------------------------
@dataclass
class Matcher:
    """A loaded model, its ``semantic-correspondence`` pipeline and what the Space knows about it."""

    name: str
    pipe: object
    model: object
    processor: object
    model_id: str

    @property
    def fast_clicks(self) -> bool:
        """Whether clicks are transferred through the cached dense field (exact for Hyperpixel Flow)."""
        from semcorr.modeling import HyperpixelFlowModel

        return type(self.model) is HyperpixelFlowModel

    @property
    def has_score_volume(self) -> bool:
        return callable(getattr(self.model, "match_scores", None)) and callable(getattr(self.model, "extract_hyperpixels", None))

    @property
    def pipeline_takes_threshold(self) -> bool:
        """Whether the pipeline accepts ``score_threshold`` (checked on its ``_sanitize_parameters``)."""
        parameters = inspect.signature(type(self.pipe)._sanitize_parameters).parameters
        return "score_threshold" in parameters


def model_key(name: str | None) -> str | None:
    """``None`` for the embedded default, else the stripped name."""
    if name is None:
        return None
    name = str(name).strip()
    return None if not name or name == DEFAULT_MODEL else name


_matchers: OrderedDict = OrderedDict()
_matcher_lock = threading.Lock()


def get_matcher(name: str | None = None) -> Matcher:
    """The matcher named ``name`` (the default, a model folder or a Hub id), loaded once and kept (two at most).

    Raises:
        ValueError: the one-line reason from :func:`semcorr.modeling.load_matcher`.
    """
    key = model_key(name)
    with _matcher_lock:
        if key in _matchers:
            _matchers.move_to_end(key)
            return _matchers[key]
        from transformers import pipeline
        from transformers.utils import logging as transformers_logging

        from semcorr.modeling import load_matcher
        from semcorr.pipelines import TASK, register_task

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
        register_task()
        model, processor, model_id = load_matcher(key, device="cpu")
        pipe = pipeline(TASK, model=model, image_processor=processor, device="cpu")
        matcher = Matcher(key or DEFAULT_MODEL, pipe, model, processor, model_id)
        _matchers[key] = matcher
        while len(_matchers) > 2:
            _matchers.popitem(last=False)
        _sessions.clear()  # sessions hold models; a dropped model must not live on in them
        return matcher


# -- pair sessions ----------------------------------------------------------------------------------
@dataclass
class PairSession:
    """One pair under one model: its preprocessed inputs and, computed once on demand, its dense
    fields, its score volume and its auto matches."""

    matcher: Matcher
    source: DemoImage
    target: DemoImage
    _inputs: dict | None = None
    _dense: object = None
    _volume: object = None
    _auto: dict = field(default_factory=dict)
    #: seconds spent on the pair's dense fields and score volume (when computed)
    timings: dict = field(default_factory=dict)
    # one lock per lazily computed part: a click (dense field) never waits for the score volume
    _inputs_lock: threading.Lock = field(default_factory=threading.Lock)
    _dense_lock: threading.Lock = field(default_factory=threading.Lock)
    _volume_lock: threading.Lock = field(default_factory=threading.Lock)
    _auto_lock: threading.Lock = field(default_factory=threading.Lock)
    #: transfers through the kept field, by working-image point: a click computes only its own point
    _transfers: dict = field(default_factory=dict)
    _transfers_lock: threading.Lock = field(default_factory=threading.Lock)

    def inputs(self) -> dict:
        with self._inputs_lock:
            if self._inputs is None:
                processed = self.matcher.processor.preprocess_pairs([self.source.image], [self.target.image])
                self._inputs = {
                    "source_pixel_values": processed["source_pixel_values"],
                    "target_pixel_values": processed["target_pixel_values"],
                }
            return self._inputs

    def dense(self):
        """``model.match`` of the pair without keypoints: ``grid_src_to_trg``, ``confidence``, ``grid_trg_to_src``."""
        import torch

        with self._dense_lock:
            if self._dense is None:
                inputs = self.inputs()
                with COMPUTE, torch.no_grad():
                    start = time.perf_counter()
                    self._dense = self.matcher.model.match(inputs["source_pixel_values"], inputs["target_pixel_values"])
                self.timings["dense"] = time.perf_counter() - start
            return self._dense

    def volume(self):
        """``(h_s, w_s, h_t, w_t)`` match scores of every source cell over every target cell, or None."""
        import torch

        if not self.matcher.has_score_volume:
            return None
        with self._volume_lock:
            if self._volume is None:
                inputs = self.inputs()
                model = self.matcher.model
                source, target = inputs["source_pixel_values"], inputs["target_pixel_values"]
                with COMPUTE, torch.no_grad():
                    start = time.perf_counter()
                    source_features = model.extract_hyperpixels(source)
                    target_features = model.extract_hyperpixels(target)
                    scores = model.match_scores(source_features, target_features, tuple(source.shape[-2:]), tuple(target.shape[-2:]))
                (h_s, w_s), (h_t, w_t) = source_features.shape[-2:], target_features.shape[-2:]
                self._volume = scores[0].reshape(h_s, w_s, h_t, w_t).float()
                self.timings["volume"] = time.perf_counter() - start
            return self._volume

    def transfer(self, points) -> dict:
        """Carry ``points`` (original source pixels) into the target.

        Returns:
            ``{"source_keypoints", "target_keypoints", "scores"}`` as the pipeline gives them, in
            original pixels.
        """
        from semcorr.modeling import validate_keypoints

        width, height = self.source.original_size
        points = validate_keypoints(points, (height, width), name="points")
        if len(points) == 0:
            return {"source_keypoints": [], "target_keypoints": [], "scores": []}
        working = self.source.to_working(points)
        if self.matcher.fast_clicks:
            target, scores = self._cached_transfers(working)
        else:
            with COMPUTE:
                result = self.matcher.pipe(
                    {"source_image": self.source.image, "target_image": self.target.image, "source_keypoints": working.tolist()}
                )
            target, scores = np.asarray(result["target_keypoints"]), np.asarray(result["scores"])
        return {
            "source_keypoints": np.asarray(points, dtype=np.float64).tolist(),
            "target_keypoints": self.target.to_original(target).tolist(),
            "scores": [float(score) for score in scores],
        }

    def _cached_transfers(self, working_points: np.ndarray):
        """:meth:`_transfer_through_field` of the points not transferred before (each point's transfer is
        independent of the others'). One new point is a few small tensor operations: milliseconds,
        where a batch of all the points would cost a multi-threaded pass on a busy CPU."""
        keys = [tuple(point) for point in working_points.astype(np.float32).tolist()]
        with self._transfers_lock:
            missing = [key for key in dict.fromkeys(keys) if key not in self._transfers]
            if missing:
                if len(self._transfers) > 4096:
                    self._transfers.clear()
                target, scores = self._transfer_through_field(np.array(missing, dtype=np.float32))
                self._transfers.update({key: (t, s) for key, t, s in zip(missing, target, scores)})
            found = [self._transfers[key] for key in keys]
        return np.array([t for t, _ in found]), np.array([s for _, s in found])

    def _transfer_through_field(self, working_points: np.ndarray):
        """What ``HyperpixelFlowModel.match`` + the pipeline's post-processing do with keypoints, on the kept field."""
        import torch

        from semcorr.modeling.ops.geometry import grid_to_pixels, pixels_to_grid
        from semcorr.modeling.ops.keypoint_transfer import transfer_keypoints

        processor, config = self.matcher.processor, self.matcher.model.config
        dense, inputs = self.dense(), self.inputs()
        source_size = tuple(inputs["source_pixel_values"].shape[-2:])
        target_size = tuple(inputs["target_pixel_values"].shape[-2:])
        source_hw = (self.source.image.height, self.source.image.width)
        target_hw = (self.target.image.height, self.target.image.width)
        with torch.no_grad():
            model_points = processor.keypoints_to_model(working_points.astype(np.float32), source_hw)
            grid_points = pixels_to_grid(model_points[None].to(dense.grid_src_to_trg.dtype), source_size)
            weights = dense.confidence if dense.transfer_weights is None else dense.transfer_weights
            target_grid, scores = transfer_keypoints(
                grid_points, dense.grid_src_to_trg, weights, radius=config.transfer_radius, scores=dense.confidence
            )
            target = processor.keypoints_to_original(grid_to_pixels(target_grid, target_size)[0], target_hw)
        return target.numpy().astype(np.float64), scores[0].clamp(0, 1).numpy().astype(np.float64)

    def auto(self, top_k: int, score_threshold: float) -> tuple[dict, str]:
        """The ``top_k`` best mutual matches with a score of at least ``score_threshold``.

        The pipeline is asked once for :data:`TOP_K_MAX` matches (and, when it accepts it, passed
        ``score_threshold``); the result is kept per threshold it was given, and cut to ``top_k``.

        Returns:
            ``(result, how)``: the pipeline-shaped result in original pixels, and ``"pipeline"`` or
            ``"space"`` -- who applied the threshold.
        """
        takes_threshold = self.matcher.pipeline_takes_threshold
        key = float(score_threshold) if takes_threshold else None
        with self._auto_lock:
            if key not in self._auto:
                kwargs = {"top_k": TOP_K_MAX}
                if takes_threshold:
                    kwargs["score_threshold"] = float(score_threshold)
                with COMPUTE:
                    self._auto[key] = self.matcher.pipe({"source_image": self.source.image, "target_image": self.target.image}, **kwargs)
            result = self._auto[key]
        rows = [
            (source, target, score)
            for source, target, score in zip(result["source_keypoints"], result["target_keypoints"], result["scores"])
            if score >= score_threshold  # the same filter again: a no-op when the pipeline applied it
        ][: int(top_k)]
        source = self.source.to_original([row[0] for row in rows]) if rows else np.zeros((0, 2))
        target = self.target.to_original([row[1] for row in rows]) if rows else np.zeros((0, 2))
        return (
            {"source_keypoints": source.tolist(), "target_keypoints": target.tolist(), "scores": [float(row[2]) for row in rows]},
            "pipeline" if takes_threshold else "space",
        )

    def score_map(self, point) -> np.ndarray | None:
        """Match scores ``(h_t, w_t)`` of the source cell under ``point`` (original pixels) over the target, or None."""
        volume = self.volume()
        if volume is None:
            return None
        h_s, w_s = volume.shape[:2]
        x, y = self.source.to_working([point])[0]
        column = int(np.clip(x / self.source.image.width * w_s, 0, w_s - 1))
        row = int(np.clip(y / self.source.image.height * h_s, 0, h_s - 1))
        return volume[row, column].numpy()


_sessions: OrderedDict = OrderedDict()
_session_lock = threading.Lock()
#: Pair sessions kept (each holds a score volume of about 40 MB at the default size).
MAX_SESSIONS = 3


def get_session(source, target, model: str | None = None, source_name=None, target_name=None) -> PairSession:
    """The cached :class:`PairSession` of two images (paths, PIL images or arrays) under ``model``."""
    source_image, target_image = open_image(source, source_name), open_image(target, target_name)
    matcher = get_matcher(model)
    key = (model_key(model), source_image.digest, target_image.digest)
    with _session_lock:
        session = _sessions.get(key)
        if session is None:
            session = _sessions[key] = PairSession(matcher, source_image, target_image)
        _sessions.move_to_end(key)
        while len(_sessions) > MAX_SESSIONS:
            _sessions.popitem(last=False)
    return session


def clear_caches() -> None:
    """Forget every cached model, pair and image."""
    with _session_lock:
        _sessions.clear()
    with _matcher_lock:
        _matchers.clear()
    with _image_lock:
        _image_cache.clear()


# -- points as text -----------------------------------------------------------------------------------
def parse_points(text: str | None) -> list[list[float]]:
    """``"x,y; x,y"`` (or one point per line) -> ``[[x, y], ...]``; empty text gives no points."""
    from semcorr.pipelines.cli import parse_keypoints

    text = (text or "").replace("\n", ";").strip()
    if not text.strip("; "):
        return []
    try:
        return parse_keypoints(text)
    except ValueError as error:
        raise ValueError(str(error).replace("--keypoints", "points")) from None


def format_points(points) -> str:
    return "; ".join(f"{x:.1f},{y:.1f}" for x, y in points)


# -- pictures -----------------------------------------------------------------------------------------
@dataclass
class PairLayout:
    """Where the two working images sit on a side-by-side picture."""

    source_size: tuple[int, int]
    target_size: tuple[int, int]

    @property
    def width(self) -> int:
        return self.source_size[0] + self.target_size[0]

    @property
    def height(self) -> int:
        return self.source_size[1]


def pair_layout(source: DemoImage, target: DemoImage, height: int = VIEW_HEIGHT) -> PairLayout:
    from semcorr.pipelines.drawing import panel_sizes

    left, right = panel_sizes(source.image.size, target.image.size, height)
    return PairLayout(left, right)


def view_to_source_point(source: DemoImage, target: DemoImage, index, height: int = VIEW_HEIGHT):
    """A click ``[x, y]`` on the side-by-side picture -> the source point (original pixels), or None
    when it fell on the target half."""
    layout = pair_layout(source, target, height)
    x, y = float(index[0]), float(index[1])
    if x >= layout.source_size[0]:
        return None
    return [x / layout.source_size[0] * source.original_size[0], y / layout.source_size[1] * source.original_size[1]]


def draw_pair(source: DemoImage, target: DemoImage, result: dict, colors=None, labels=None, height: int = VIEW_HEIGHT) -> Image.Image:
    """The pair side by side with a line per match (:func:`semcorr.pipelines.draw_matches`) and labels.

    ``colors``: one RGB per match (default: coloured by score); ``labels``: ``(source_label,
    target_label)`` strings per match, written next to the dots.
    """
    from semcorr.pipelines.drawing import draw_matches

    working = {
        "source_keypoints": source.to_working(result["source_keypoints"]).tolist(),
        "target_keypoints": target.to_working(result["target_keypoints"]).tolist(),
        "scores": list(result["scores"]),
    }
    layout = pair_layout(source, target, height)
    canvas = draw_matches(source.image, target.image, working, max_height=height, line_width=3 if labels else 2, colors=colors)
    if labels:
        draw = ImageDraw.Draw(canvas)
        from semcorr.pipelines.drawing import font as label_font

        font = label_font(16)
        scale_source = np.array(layout.source_size) / np.array(source.image.size)
        scale_target = np.array(layout.target_size) / np.array(target.image.size)
        for index, (source_label, target_label) in enumerate(labels):
            color = tuple(colors[index]) if colors else (255, 255, 255)
            sx, sy = np.array(working["source_keypoints"][index]) * scale_source
            tx, ty = np.array(working["target_keypoints"][index]) * scale_target + [layout.source_size[0], 0]
            for (x, y), text in (((sx, sy), source_label), ((tx, ty), target_label)):
                if text:
                    draw.text((x + 6, y - 5), text, fill=color, font=font, anchor="ld", stroke_width=2, stroke_fill=(0, 0, 0))
    return canvas


def heat_map_picture(session: PairSession, point, transferred, color) -> Image.Image | None:
    """The target with the score map of ``point`` over it (bright = high), the transfer ringed in ``color``."""
    scores = session.score_map(point)
    if scores is None:
        return None
    target = session.target.image
    scores = np.clip(scores / max(float(scores.max()), 1e-12), 0, 1).astype(np.float32)
    values = np.clip(np.asarray(Image.fromarray(scores).resize(target.size, Image.BILINEAR)), 0, 1)
    position = values * (len(_HEAT_STOPS) - 1)
    low = np.floor(position).astype(int).clip(0, len(_HEAT_STOPS) - 2)
    mix = (position - low)[..., None]
    heat = (1 - mix) * _HEAT_STOPS[low] + mix * _HEAT_STOPS[low + 1]
    grey = np.asarray(target.convert("L"), dtype=np.float64)[..., None]
    picture = Image.fromarray(np.clip(0.35 * grey + 0.65 * heat, 0, 255).astype(np.uint8))
    if transferred is not None:
        x, y = session.target.to_working([transferred])[0]
        radius = max(6, round(max(target.size) / 80))
        draw = ImageDraw.Draw(picture)
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], outline=tuple(color), width=3)
        draw.ellipse([x - radius - 2, y - radius - 2, x + radius + 2, y + radius + 2], outline=(255, 255, 255), width=1)
    return picture


def dense_picture(session: PairSession, kind: str = "warp") -> Image.Image:
    """The source next to the target warped onto it through ``grid_src_to_trg`` (``kind="warp"``),
    or next to the field's displacement coloured by direction and length (``kind="flow"``)."""
    import torch
    import torch.nn.functional as F

    dense = session.dense()
    source, target = session.source.image, session.target.image
    size = (source.height, source.width)
    grid = F.interpolate(dense.grid_src_to_trg.float(), size=size, mode="bilinear", align_corners=False)  # (1, 2, H, W)
    if kind == "flow":
        from semcorr.modeling.ops.geometry import grid_axes

        xs, ys = grid_axes(size[0], size[1])
        identity = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1])  # (2, H, W): x, y
        flow = (grid[0] - identity).numpy()
        magnitude = np.hypot(flow[0], flow[1])
        hue = (np.arctan2(flow[1], flow[0]) / (2 * np.pi)) % 1.0
        saturation = np.clip(magnitude / max(float(np.percentile(magnitude, 99)), 1e-6), 0, 1)
        right = Image.fromarray((hsv_to_rgb(hue, saturation) * 255).round().astype(np.uint8))
    else:
        pixels = torch.from_numpy(np.asarray(target, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        warped = F.grid_sample(pixels, grid.permute(0, 2, 3, 1), mode="bilinear", align_corners=False, padding_mode="zeros")
        right = Image.fromarray((warped[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8))
    height = min(VIEW_HEIGHT, source.height)
    width = max(1, round(source.width * height / source.height))
    canvas = Image.new("RGB", (2 * width + 8, height), "white")
    canvas.paste(source.resize((width, height), Image.BILINEAR), (0, 0))
    canvas.paste(right.resize((width, height), Image.BILINEAR), (width + 8, 0))
    return canvas


def hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` RGB in ``[0, 1]`` of hues and saturations in ``[0, 1]`` at full value."""
    sector = np.floor(hue * 6.0).astype(int) % 6
    fraction = hue * 6.0 - np.floor(hue * 6.0)
    value = np.ones_like(hue)
    p, q, t = 1.0 - saturation, 1.0 - saturation * fraction, 1.0 - saturation * (1.0 - fraction)
    choices = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)]
    channels = [np.select([sector == i for i in range(6)], [choice[c] for choice in choices]) for c in range(3)]
    return np.stack(channels, axis=-1)


# -- result files -------------------------------------------------------------------------------------
_output_dir: Path | None = None
_output_lock = threading.Lock()
#: Result files older than this (seconds) are deleted when a new one is written.
OUTPUT_MAX_AGE = 1800


def output_dir() -> Path:
    """The process's temporary folder for result files (made on first use, inside the system temp dir)."""
    global _output_dir
    with _output_lock:
        if _output_dir is None or not _output_dir.is_dir():
            _output_dir = Path(tempfile.mkdtemp(prefix="semcorr-space-"))
            atexit.register(shutil.rmtree, _output_dir, ignore_errors=True)
        return _output_dir


def _prune(folder: Path) -> None:
    cutoff = time.time() - OUTPUT_MAX_AGE
    for path in folder.glob("*"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
        except OSError:
            pass


def write_results(payload: dict, picture: Image.Image) -> tuple[str, str, str]:
    """Write ``payload`` as JSON, ``picture`` as PNG (the download) and as JPEG (the page's view, a
    tenth of the bytes) into :func:`output_dir`; return the three paths."""
    folder = output_dir()
    _prune(folder)
    stem = f"semcorr-matches-{uuid.uuid4().hex[:10]}"
    json_path, png_path, view_path = folder / f"{stem}.json", folder / f"{stem}.png", folder / f"{stem}-view.jpg"
    json_path.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    picture.save(png_path, format="PNG", compress_level=1)  # fast: a click waits for it
    picture.save(view_path, format="JPEG", quality=92)
    return str(json_path), str(png_path), str(view_path)
