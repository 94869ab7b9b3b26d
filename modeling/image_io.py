"""Reading user images into RGB PIL images with clear errors."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# PIL's own decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS): larger images are refused
# before decoding; smaller ones are resized by the image processor in uint8, so a 10000 x 10000
# photo costs about 300 MB once.
MAX_IMAGE_PIXELS = 2 * 89_478_485


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Values of any numeric dtype -> uint8, by the range the dtype and values imply.

    One rule for files, PIL images and arrays alike. Integers: 0..255 when every value fits,
    else 0..65535 (16-bit). Floats: [0, 1] when they fit, else 0..255, else scaled by the maximum.
    """
    if values.dtype == np.uint8:
        return values
    floating = np.issubdtype(values.dtype, np.floating)
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError("image contains NaN or infinite values")
    peak = values.max(initial=0.0)
    ranges = (1.0, 255.0) if floating else (255.0, 65535.0)
    top = next((limit for limit in ranges if peak <= limit), peak)
    return np.clip(values / top * 255.0, 0, 255).round().astype(np.uint8)


def _to_uint8_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / 32-bit / float grey: PIL's convert("RGB") would clip at 255.
        return Image.fromarray(_scale_to_uint8(np.asarray(image))).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"a numpy image must be HxW, HxWx3 or HxWx4 (or CxHxW), got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"empty image array of shape {array.shape}")
    if array.shape[0] * array.shape[1] > MAX_IMAGE_PIXELS:
        raise ValueError(f"image of {array.shape[1]}x{array.shape[0]} pixels exceeds the limit of {MAX_IMAGE_PIXELS}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    array = _scale_to_uint8(array)
    return _to_uint8_rgb(Image.fromarray(array))


def load_image(image) -> Image.Image:
    """Return ``image`` as an RGB PIL image.

    Args:
        image: a path (str / ``os.PathLike``), a PIL image, or a numpy array (HxW, HxWx3,
            HxWx4, CxHxW; uint8, 16-bit or float in [0, 1]). Grayscale, palette, RGBA and 16-bit
            images are converted, not rejected (transparency composited on white). A photo's EXIF
            orientation is applied (``ImageOps.exif_transpose``), so pixels -- and keypoints --
            are in the frame the photo is displayed in.

    Raises:
        ValueError: missing file, a directory, bytes that are not an image, a truncated file, an
            empty or oversized image, or an unsupported type. The message names the file.
    """
    if isinstance(image, Image.Image):
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ValueError(f"image of {image.width}x{image.height} pixels exceeds the limit of {MAX_IMAGE_PIXELS}")
        return _to_uint8_rgb(ImageOps.exif_transpose(image))
    if isinstance(image, np.ndarray):
        return _from_array(image)
    if isinstance(image, (str, os.PathLike)):
        return _open_path(Path(image))
    raise TypeError(f"expected an image path, a PIL image or a numpy array, got {type(image).__name__}")


def _open_path(path: Path) -> Image.Image:
    if path.is_dir():
        raise ValueError(f"image file not found: {path} is a directory, not an image file; give the path of an image file")
    if not path.is_file():
        raise ValueError(f"image file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.load()
                return _to_uint8_rgb(ImageOps.exif_transpose(opened))
    except Image.DecompressionBombError:
        raise ValueError(f"{path} has more than {MAX_IMAGE_PIXELS} pixels; downscale it first") from None
    except UnidentifiedImageError:
        raise ValueError(f"{path} is not an image file PIL can read") from None
    except (OSError, SyntaxError) as error:
        raise ValueError(f"{path} could not be decoded (truncated or corrupt image): {error}") from None
