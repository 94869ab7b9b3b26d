"""Bad and unusual inputs, through the image loader and through the pipeline.

Broken input must raise a ValueError/TypeError that names the problem; unusual but valid images
(grayscale, RGBA, palette, 16-bit, tiny, huge) are converted and matched, not rejected.
"""

from __future__ import annotations

import resource

import numpy as np
import pytest
from PIL import Image

from semcorr.modeling import image_io, load_image

from .conftest import textured_image

KEYPOINTS = [[5.0, 5.0], [20.0, 15.0]]


@pytest.fixture(scope="module")
def good_image():
    return textured_image(32, 40, seed=3)


def _run(pipe, source, target, keypoints=KEYPOINTS):
    request = {"source_image": source, "target_image": target}
    if keypoints is not None:
        request["source_keypoints"] = keypoints
    return pipe(request)


def _assert_valid_result(result, count, target_size):
    width, height = target_size
    assert len(result["target_keypoints"]) == len(result["scores"]) == count
    target = np.asarray(result["target_keypoints"], dtype=np.float64).reshape(-1, 2)
    assert np.isfinite(target).all()
    assert (target[:, 0] >= 0).all() and (target[:, 0] <= width).all()
    assert (target[:, 1] >= 0).all() and (target[:, 1] <= height).all()


# -- files that cannot be read ---------------------------------------------------------------------
def test_missing_file(tiny_pipeline, good_image, tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ValueError, match="image file not found: .*nope.jpg"):
        load_image(missing)
    with pytest.raises(ValueError, match="image file not found"):
        _run(tiny_pipeline, str(missing), good_image)
    with pytest.raises(ValueError, match="image file not found"):
        load_image(tmp_path)  # a directory is not an image file


def test_non_image_bytes(tiny_pipeline, good_image, tmp_path):
    path = tmp_path / "notes.png"
    path.write_bytes(b"these are not the pixels you are looking for\n" * 20)
    with pytest.raises(ValueError, match="notes.png is not an image file"):
        load_image(path)
    with pytest.raises(ValueError, match="not an image file"):
        _run(tiny_pipeline, good_image, path)


def test_truncated_jpeg(tiny_pipeline, good_image, tmp_path):
    full = tmp_path / "full.jpg"
    Image.fromarray(textured_image(120, 160, seed=4)).save(full, quality=95)
    data = full.read_bytes()
    truncated = tmp_path / "half.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="half.jpg could not be decoded .*truncated"):
        load_image(truncated)
    with pytest.raises(ValueError, match="truncated"):
        _run(tiny_pipeline, truncated, good_image)
    assert load_image(full).size == (160, 120)  # the intact file is fine


def test_oversized_images_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(image_io, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ValueError, match="exceeds the limit"):
        load_image(Image.new("RGB", (20, 20)))
    path = tmp_path / "bomb.png"
    Image.new("RGB", (40, 40)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # PIL refuses > 2x its limit before decoding
    with pytest.raises(ValueError, match="downscale it first"):
        load_image(path)


# -- unusual but valid images are converted ----------------------------------------------------------
def test_grayscale_png(tiny_pipeline, good_image, tmp_path):
    path = tmp_path / "grey.png"
    grey = (np.arange(32 * 40) % 256).astype(np.uint8).reshape(32, 40)
    Image.fromarray(grey).save(path)
    assert Image.open(path).mode == "L"
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (40, 32)
    assert (np.asarray(loaded) == grey[..., None]).all()
    _assert_valid_result(_run(tiny_pipeline, path, good_image), 2, (40, 32))


def test_rgba_png_is_composited_on_white(tiny_pipeline, good_image, tmp_path):
    rgba = np.zeros((32, 40, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, :20, 3] = 255  # left half opaque red-ish, right half fully transparent
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(path)
    loaded = np.asarray(load_image(path))
    assert loaded.shape == (32, 40, 3)
    assert tuple(loaded[5, 5]) == (200, 0, 0)
    assert tuple(loaded[5, 30]) == (255, 255, 255)
    _assert_valid_result(_run(tiny_pipeline, good_image, path), 2, (40, 32))
    assert tuple(np.asarray(load_image(rgba))[5, 30]) == (255, 255, 255)  # numpy HxWx4 too


def test_palette_png(tiny_pipeline, good_image, tmp_path):
    rgb = textured_image(32, 40, seed=5)
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    path = tmp_path / "palette.png"
    palette.save(path)
    assert Image.open(path).mode == "P"
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert np.array_equal(np.asarray(loaded), np.asarray(palette.convert("RGB")))
    transparent = tmp_path / "palette_t.png"
    palette.save(transparent, transparency=0)
    assert load_image(transparent).mode == "RGB"
    _assert_valid_result(_run(tiny_pipeline, path, transparent), 2, (40, 32))


def test_16_bit_png_is_rescaled_not_clipped(tiny_pipeline, good_image, tmp_path):
    values = np.zeros((32, 40), dtype=np.uint16)
    values[:, :10], values[:, 10:20], values[:, 20:30], values[:, 30:] = 0, 16384, 32768, 65535
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    loaded = np.asarray(load_image(path))
    assert loaded.shape == (32, 40, 3)
    assert loaded[0, 0, 0] == 0 and loaded[0, 35, 0] == 255
    assert abs(int(loaded[0, 25, 0]) - 127) <= 1 and abs(int(loaded[0, 15, 0]) - 64) <= 1  # not all 255
    _assert_valid_result(_run(tiny_pipeline, path, good_image), 2, (40, 32))


def test_numpy_forms():
    base = textured_image(8, 12, seed=6)
    assert np.array_equal(np.asarray(load_image(base)), base)
    assert np.array_equal(np.asarray(load_image(np.moveaxis(base, -1, 0))), base)  # CHW
    assert np.array_equal(np.asarray(load_image(base.astype(np.float32) / 255.0)), base)  # float in [0, 1]
    sixteen = (base.astype(np.uint16) * 257)
    assert np.array_equal(np.asarray(load_image(sixteen)), base)
    assert np.asarray(load_image(base[..., :1])).shape == (8, 12, 3)  # HxWx1
    with pytest.raises(ValueError, match="shape"):
        load_image(np.zeros((8, 12, 2), np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        load_image(np.full((8, 12), np.nan))
    with pytest.raises(ValueError, match="empty"):
        load_image(np.zeros((0, 12, 3), np.uint8))
    with pytest.raises(TypeError, match="expected an image path"):
        load_image(12345)


def test_one_by_one_image_works(tiny_pipeline, good_image):
    pixel = np.array([[[10, 200, 30]]], dtype=np.uint8)
    assert load_image(pixel).size == (1, 1)
    # As source, with its only valid keypoints; and as target.
    result = _run(tiny_pipeline, pixel, good_image, keypoints=[[0.5, 0.5], [1.0, 1.0]])
    _assert_valid_result(result, 2, (40, 32))
    result = _run(tiny_pipeline, good_image, pixel)
    _assert_valid_result(result, 2, (1, 1))
    top = _run(tiny_pipeline, pixel, pixel, keypoints=None)
    assert len(top["scores"]) >= 1
    assert all(0 <= v <= 1 for point in top["source_keypoints"] + top["target_keypoints"] for v in point)
    with pytest.raises(ValueError, match="outside the 1x1 image"):
        _run(tiny_pipeline, pixel, good_image, keypoints=[[1.5, 0.5]])


def test_huge_numpy_image_is_resized_in_uint8(tiny_pipeline, good_image):
    tile = textured_image(100, 100, seed=7)
    huge = np.tile(tile, (100, 100, 1))  # 10000 x 10000 x 3 uint8, 300 MB
    assert huge.shape == (10000, 10000, 3) and huge.dtype == np.uint8
    peak_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = _run(tiny_pipeline, huge, good_image, keypoints=[[5000.0, 5000.0], [9999.0, 1.0]])
    growth_gib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before_kib) / 2**20
    del huge
    _assert_valid_result(result, 2, (40, 32))
    np.testing.assert_allclose(result["source_keypoints"], [[5000.0, 5000.0], [9999.0, 1.0]], rtol=1e-5)
    assert growth_gib < 1.5  # a float copy of the image alone would be 1.2 GB (float32) / 2.4 GB (float64)


# -- bad keypoints ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "keypoints, message",
    [
        ([[5.0, 5.0], [41.0, 3.0]], r"source_keypoints\[1\] = \[41.0, 3.0\] lies outside the 40x32 image"),
        ([[-1.0, 3.0]], r"source_keypoints\[0\].*outside"),
        ([[5.0, 33.0]], r"outside the 40x32 image"),
        ([[5.0, 5.0], [float("nan"), 1.0]], r"source_keypoints\[1\].*not finite \(NaN or inf\)"),
        ([[1.0, 2.0, 3.0]], r"must have shape \(N, 2\).*got shape \(1, 3\)"),
        ([[[1.0, 2.0]]], r"must have shape \(N, 2\)"),
        ("5,5", r"list of \(x, y\) pairs"),
    ],
)
def test_bad_keypoints(tiny_pipeline, good_image, keypoints, message):
    with pytest.raises(ValueError, match=message):
        _run(tiny_pipeline, good_image, good_image, keypoints=keypoints)


# -- bad requests ----------------------------------------------------------------------------------
def test_unknown_input_key(tiny_pipeline, good_image):
    with pytest.raises(ValueError, match=r"unknown keys \['source_points'\]"):
        tiny_pipeline({"source_image": good_image, "target_image": good_image, "source_points": KEYPOINTS})
    with pytest.raises(ValueError, match=r"input 1 .*unknown keys \['mask'\]"):
        tiny_pipeline([{"source_image": good_image, "target_image": good_image},
                       {"source_image": good_image, "target_image": good_image, "mask": None}])


def test_missing_input_key(tiny_pipeline, good_image):
    with pytest.raises(ValueError, match=r"lacks \['target_image'\]"):
        tiny_pipeline({"source_image": good_image})


@pytest.mark.parametrize("request_", [[None], [("a.png", "b.png")]])
def test_non_dict_item_in_list(tiny_pipeline, request_):
    with pytest.raises(TypeError, match="input 0 must be a dict with 'source_image' and 'target_image'"):
        tiny_pipeline(request_)


@pytest.mark.parametrize("request_", ["a.png", 42])
def test_non_dict_non_list_input(tiny_pipeline, request_):
    with pytest.raises(TypeError, match="expected a dict with 'source_image' and 'target_image' or a list"):
        tiny_pipeline(request_)


def test_tuple_of_images_is_not_a_request(tiny_pipeline, good_image):
    with pytest.raises(TypeError, match="must be a dict"):
        tiny_pipeline((good_image, good_image))


def test_16_bit_values_load_alike_from_array_pil_and_file(tmp_path):
    from PIL import Image

    from semcorr.modeling import load_image

    low = np.full((6, 8), 100, dtype=np.uint16)
    low[0, 0] = 50  # every value fits in 8 bits: read as 8-bit values, whatever the container
    high = low.astype(np.uint32) * 300  # needs 16 bits: scaled by 65535
    for values, expected in ((low, [50, 100]), (high, [round(15000 / 65535 * 255), round(30000 / 65535 * 255)])):
        path = tmp_path / "grey16.png"
        Image.fromarray(values.astype(np.uint16)).save(path)
        loaded = [np.asarray(load_image(source))[..., 0] for source in (values.astype(np.uint16), Image.open(path), path)]
        for grey in loaded:
            assert [int(grey[0, 0]), int(grey[1, 1])] == expected
