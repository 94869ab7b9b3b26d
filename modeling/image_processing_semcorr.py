"""Image processor for semcorr matchers: resize + normalise pairs, map keypoints both ways."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs

from .image_io import load_image


#: How every image is resized for a model, in training and inference alike.
RESAMPLE = Image.BILINEAR


def image_to_unit_tensor(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """An RGB PIL image resized to ``size = (height, width)`` as a float ``(3, H, W)`` tensor in ``[0, 1]``.

    The one resizing rule of semcorr (bilinear; ``reducing_gap=3`` first reduces a large photo by an
    integer factor with a box filter, which is both faster and free of aliasing). The image processor
    normalises its output; training code warps it first (synthetic pairs) and normalises after.
    """
    height, width = size
    resized = image.resize((width, height), RESAMPLE, reducing_gap=3.0)
    return torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


class SemanticCorrespondenceImageProcessorKwargs(ImagesKwargs, total=False):
    keypoint_tolerance: float


def validate_keypoints(keypoints, image_size: tuple[int, int], name: str = "source_keypoints", tolerance: float = 0.0):
    """Check user keypoints against an image and return them as a float32 ``(N, 2)`` array.

    Args:
        keypoints: ``(N, 2)`` (x, y) pixels (list, numpy or torch).
        image_size: ``(height, width)`` of the image they belong to.
        tolerance: how far outside ``[0, width] x [0, height]`` a point may lie, in pixels.

    Raises:
        ValueError: wrong shape or type (a ragged list, strings, wrong nesting: the message says which
            point and shows the expected ``[[x, y], ...]``), NaN/inf, or a point outside the image
            (the first one is named).
    """
    if isinstance(keypoints, torch.Tensor):
        keypoints = keypoints.detach().cpu().numpy()
    problem = _string_problem(keypoints)
    if problem is None:
        try:
            array = np.asarray(keypoints, dtype=np.float64)
        except (TypeError, ValueError):  # ragged rows, a None or an object among the values, ...
            problem = _keypoint_structure_problem(keypoints) or f"got a {type(keypoints).__name__} of non-numbers"
    if problem is not None:
        raise ValueError(f"{name} must be a list of (x, y) pairs like [[x, y], ...] in pixels; {problem}")
    if array.size == 0:
        return np.zeros((0, 2), dtype=np.float32)
    if array.ndim != 2 or array.shape[1] != 2:
        hint = "; a single point is written [[x, y]]" if array.shape == (2,) else ""
        raise ValueError(f"{name} must have shape (N, 2) as (x, y) pixels like [[x, y], ...], got shape {array.shape}{hint}")
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name}[{index}] = {array[index].tolist()} is not finite (NaN or inf)")
    height, width = image_size
    outside = (
        (array[:, 0] < -tolerance) | (array[:, 0] > width + tolerance)
        | (array[:, 1] < -tolerance) | (array[:, 1] > height + tolerance)
    )
    if outside.any():
        index = int(np.flatnonzero(outside)[0])
        raise ValueError(
            f"{name}[{index}] = {array[index].tolist()} lies outside the {width}x{height} image "
            "(x must be in [0, width], y in [0, height], pixels from the top-left corner)"
        )
    return array.astype(np.float32)


def _string_problem(keypoints) -> str | None:
    """Strings where numbers belong (numpy would quietly parse ``"12"``), described; else None."""
    if isinstance(keypoints, (str, bytes)):
        return f"got the string {keypoints!r} (parse it into numbers first)"
    if isinstance(keypoints, np.ndarray):
        return f"got an array of strings (dtype {keypoints.dtype}); convert it to numbers first" if keypoints.dtype.kind in "US" else None
    if not isinstance(keypoints, (list, tuple)):
        return None
    for index, point in enumerate(keypoints):
        if isinstance(point, (str, bytes)):
            return f"point {index} is the string {point!r}, not [x, y]"
        if isinstance(point, (list, tuple)):
            for value in point:
                if isinstance(value, (str, bytes)):
                    return f"point {index} = {_short(point)} holds the string {value!r}, not a number"
    return None


def _keypoint_structure_problem(keypoints) -> str | None:
    """What is wrong with a keypoint list numpy cannot read as numbers (ragged rows, mixed nesting), or None."""
    if keypoints is None or isinstance(keypoints, (dict, set)) or not hasattr(keypoints, "__len__"):
        return f"got {type(keypoints).__name__}"
    for index, point in enumerate(keypoints):
        if isinstance(point, torch.Tensor):
            point = point.detach().cpu().numpy()
        if not hasattr(point, "__len__"):
            return (f"point {index} is the single value {point!r}, not [x, y] (wrong nesting: a single point is "
                    "written [[x, y]])")
        if len(point) != 2:
            return f"point {index} = {_short(point)} has {len(point)} values, not 2 (a ragged list?)"
        for value in point:
            if hasattr(value, "__len__") and np.ndim(value) != 0:
                return (f"point {index} = {_short(point)} holds the sequence {_short(value)}, not a number "
                        "(wrong nesting: each point is [x, y])")
            try:
                float(value)
            except (TypeError, ValueError):
                return f"point {index} = {_short(point)} holds {value!r} ({type(value).__name__}), not a number"
    return None


def _short(value, limit: int = 60) -> str:
    text = repr(value.tolist() if isinstance(value, np.ndarray) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def pad_keypoints(keypoint_sets) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack keypoint sets of different lengths into one zero-padded batch, as ``match()`` takes them.

    Args:
        keypoint_sets: ``B`` sets of ``(N_i, 2)`` (x, y) points (lists, numpy or torch; None or
            empty for a set without points).

    Returns:
        ``(padded, mask)``: ``padded`` ``(B, N_max, 2)`` float32 on the CPU, ``mask`` ``(B, N_max)``
        bool, True for a real point. Padding rows and non-finite points (NaN marks an unannotated
        keypoint) are 0 in ``padded`` and False in ``mask``, so a model never sees a NaN.
        ``N_max >= 1`` even when every set is empty, because models cannot index a width-0 batch.

    Raises:
        ValueError: a set that is not ``(N, 2)``; the message names its index.
    """
    points = [_point_rows(keypoints, index) for index, keypoints in enumerate(keypoint_sets)]
    width = max([len(rows) for rows in points] + [1])
    padded = torch.zeros(len(points), width, 2)
    mask = torch.zeros(len(points), width, dtype=torch.bool)
    for row, rows in enumerate(points):
        finite = torch.isfinite(rows).all(dim=1)
        padded[row, : len(rows)] = torch.where(finite[:, None], rows, torch.zeros(()))
        mask[row, : len(rows)] = finite
    return padded, mask


def _point_rows(keypoints, index: int) -> torch.Tensor:
    """One keypoint set as a float32 ``(N, 2)`` CPU tensor (``(0, 2)`` for None or empty)."""
    if isinstance(keypoints, torch.Tensor):
        keypoints = keypoints.detach().cpu().float()
    points = torch.as_tensor(np.asarray([] if keypoints is None else keypoints, dtype=np.float32))
    if points.numel() == 0:
        return torch.zeros(0, 2)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"keypoint set {index} must have shape (N, 2) as (x, y) pixels, got shape {tuple(points.shape)}")
    return points


class SemanticCorrespondenceImageProcessor(BaseImageProcessor):
    r"""Prepares images for semcorr matchers and maps keypoints between original and model pixels.

    Every image is resized to ``size = {"height": H, "width": W}`` (pairs are resized
    independently; the aspect ratio is not kept, as in the PF-PASCAL / SPair protocols), scaled to
    ``[0, 1]`` and normalised with ``image_mean`` / ``image_std``. Resizing happens in uint8 PIL,
    so large photos never become large float tensors.

    Keypoints follow the package convention: (x, y) pixels, origin at the top-left corner of the
    image, pixel ``i`` covering ``[i, i+1)``; the map between original and model pixels is a pure
    scaling ``x_model = x * W / width``.
    """

    valid_kwargs = SemanticCorrespondenceImageProcessorKwargs
    model_input_names = ["pixel_values"]
    resample = RESAMPLE

    def __init__(
        self,
        size: dict[str, int] | None = None,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        keypoint_tolerance: float = 0.0,
        **kwargs: Any,
    ):
        kwargs.pop("resample", None)
        super().__init__(**kwargs)
        size = dict(size or {"height": 448, "width": 448})
        if set(size) != {"height", "width"} or min(size.values()) < 1:
            raise ValueError(f"size must be {{'height': H, 'width': W}} with positive ints, got {size}")
        self.size = {"height": int(size["height"]), "width": int(size["width"])}
        self.image_mean = list(image_mean if image_mean is not None else [0.485, 0.456, 0.406])
        self.image_std = list(image_std if image_std is not None else [0.229, 0.224, 0.225])
        self.keypoint_tolerance = float(keypoint_tolerance)
        self._valid_kwargs_names = list(self.valid_kwargs.__annotations__)

    # -- images ---------------------------------------------------------------------------------
    @property
    def model_size(self) -> tuple[int, int]:
        """``(height, width)`` of the model input."""
        return self.size["height"], self.size["width"]

    def _to_tensor(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(image_to_unit_tensor(image, self.model_size))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(..., 3, H, W)`` values in ``[0, 1]`` -> the model's input normalisation."""
        mean = torch.tensor(self.image_mean, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
        std = torch.tensor(self.image_std, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
        return (pixels - mean) / std

    def preprocess(self, images, keypoints=None, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        """Resize and normalise images (and map their keypoints into model pixels).

        Args:
            images: one image or a list (paths, PIL images or numpy arrays).
            keypoints: optional, one ``(N_i, 2)`` array per image, in original pixels.

        Returns:
            ``BatchFeature`` with ``pixel_values (B, 3, H, W)``, ``original_sizes (B, 2)`` as
            ``(height, width)`` and, when keypoints were given, ``keypoints``: a list of
            ``(N_i, 2)`` float tensors in model-input pixels.
        """
        if kwargs:
            unknown = sorted(set(kwargs) - set(self._valid_kwargs_names))
            if unknown:
                raise TypeError(f"unexpected arguments {unknown} for {type(self).__name__}.preprocess")
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        if not images:
            raise ValueError("no images given")
        loaded = [load_image(image) for image in images]
        original_sizes = torch.tensor([[image.height, image.width] for image in loaded], dtype=torch.long)
        data: dict[str, Any] = {
            "pixel_values": torch.stack([self._to_tensor(image) for image in loaded]),
            "original_sizes": original_sizes,
        }
        if keypoints is not None:
            if single:
                keypoints = [keypoints]
            if len(keypoints) != len(loaded):
                raise ValueError(f"got {len(keypoints)} keypoint sets for {len(loaded)} images")
            data["keypoints"] = [
                self.keypoints_to_model(
                    validate_keypoints(points, tuple(size.tolist()), f"keypoints of image {index}", self.keypoint_tolerance),
                    tuple(size.tolist()),
                )
                for index, (points, size) in enumerate(zip(keypoints, original_sizes))
            ]
        if return_tensors not in ("pt", None):
            raise ValueError(f"only return_tensors='pt' is supported, got {return_tensors!r}")
        return BatchFeature(data=data)

    # -- keypoints ------------------------------------------------------------------------------
    def _scale(self, original_size, like) -> torch.Tensor:
        height, width = (int(v) for v in original_size)
        model_height, model_width = self.model_size
        return torch.as_tensor([model_width / width, model_height / height], dtype=torch.float32).to(like.device)

    def keypoints_to_model(self, keypoints, original_size: tuple[int, int]) -> torch.Tensor:
        """``(N, 2)`` original pixels of an image of ``original_size = (h, w)`` -> model-input pixels."""
        points = torch.as_tensor(np.asarray(keypoints, dtype=np.float32) if not isinstance(keypoints, torch.Tensor) else keypoints).float()
        return points * self._scale(original_size, points)

    def keypoints_to_original(self, keypoints, original_size: tuple[int, int], clamp: bool = True) -> torch.Tensor:
        """``(..., 2)`` model-input pixels -> original pixels of an image of ``original_size = (h, w)``.

        With ``clamp`` (default) the points are clamped to the image, ``x`` to ``[0, width]`` and
        ``y`` to ``[0, height]``: whatever a model predicts (a point a hair outside its input, from
        rounding or extrapolation), every point the pipeline returns lies on the image. NaN stays
        NaN. The evaluation passes ``clamp=False``: PCK scores the model's own prediction.
        """
        points = torch.as_tensor(keypoints).float()
        original = points / self._scale(original_size, points)
        if not clamp:
            return original
        height, width = (float(v) for v in original_size)
        upper = torch.tensor([width, height], dtype=original.dtype, device=original.device)
        return torch.minimum(torch.maximum(original, torch.zeros_like(upper)), upper)

    def preprocess_pairs(self, source_images, target_images, source_keypoints=None) -> BatchFeature:
        """Preprocess aligned lists of source and target images.

        Returns:
            ``BatchFeature`` with ``source_pixel_values``, ``target_pixel_values`` (B, 3, H, W),
            ``source_original_sizes``, ``target_original_sizes`` (B, 2) and, if given,
            ``source_keypoints`` (list of ``(N_i, 2)`` model-input pixels).
        """
        if len(source_images) != len(target_images):
            raise ValueError(f"{len(source_images)} source images but {len(target_images)} target images")
        source = self.preprocess(list(source_images), keypoints=source_keypoints)
        target = self.preprocess(list(target_images))
        data = {
            "source_pixel_values": source["pixel_values"],
            "target_pixel_values": target["pixel_values"],
            "source_original_sizes": source["original_sizes"],
            "target_original_sizes": target["original_sizes"],
        }
        if source_keypoints is not None:
            data["source_keypoints"] = source["keypoints"]
        return BatchFeature(data=data)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        for key in ("_valid_kwargs_names", "_valid_processor_keys", "resample"):
            output.pop(key, None)
        return output


def image_processor_for(config) -> SemanticCorrespondenceImageProcessor:
    """The image processor matching a model config's ``image_size``, ``image_mean``, ``image_std``."""
    height, width = config.image_size
    return SemanticCorrespondenceImageProcessor(
        size={"height": height, "width": width}, image_mean=config.image_mean, image_std=config.image_std
    )
