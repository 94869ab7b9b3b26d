"""Converter of the official PMD student checkpoints, on a tiny stand-in in the official key layout.

The released checkpoints sit on ResNet-101 (1024 / 2048 channels); here the same key layout is
written with ResNet-18 channels (layer3 256, layer4 512) so conversion, loading and the pipeline
stay fast. The backbone is left random (``backbone_weights=None``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from semcorr.modeling.pmd.convert_pmd_original_checkpoint import convert_pmd_checkpoint, main, map_official_keys

OVERRIDES = dict(backbone="resnet18", image_size=[64, 64])


def _conv_bn(prefix: str, channels_in: int, channels_out: int, kernel: int, generator) -> dict:
    return {
        f"{prefix}0.weight": torch.randn(channels_out, channels_in, kernel, kernel, generator=generator) * 0.01,
        f"{prefix}0.bias": torch.randn(channels_out, generator=generator) * 0.01,
        f"{prefix}1.weight": 1 + 0.1 * torch.randn(channels_out, generator=generator),
        f"{prefix}1.bias": 0.1 * torch.randn(channels_out, generator=generator),
        f"{prefix}1.running_mean": 0.1 * torch.randn(channels_out, generator=generator),
        f"{prefix}1.running_var": 0.5 + torch.rand(channels_out, generator=generator),
        f"{prefix}1.num_batches_tracked": torch.tensor(1234),
    }


def official_state_dict(c3: int = 256, c4: int = 512, seed: int = 0) -> dict:
    """Random tensors under the official PMD names (ResNet-18 widths)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for block in ("conv1.", "conv2."):
        state.update(_conv_bn(f"adap_layer_feat3.{block}", c3, c3, 5, generator))
        state.update(_conv_bn(f"adap_layer_feat4.{block}", c4, c4, 3, generator))
    state.update(_conv_bn("chn4.mu_conv.", 2 * c4, c4, 1, generator))
    return state


@pytest.fixture(scope="module")
def official():
    return official_state_dict()


@pytest.fixture(scope="module")
def converted(tmp_path_factory, official):
    root = tmp_path_factory.mktemp("pmd-convert")
    checkpoint = root / "pascal_tiny.pt"
    torch.save(official, checkpoint)
    return convert_pmd_checkpoint(checkpoint, root / "out", backbone_weights=None, config_overrides=OVERRIDES)


def test_key_mapping():
    mapped, unexpected = map_official_keys({
        "adap_layer_feat3.conv1.0.weight": torch.zeros(1),
        "adap_layer_feat4.conv2.1.running_var": torch.zeros(1),
        "chn4.mu_conv.1.bias": torch.zeros(1),
        "feature_extraction.model.conv1.weight": torch.zeros(1),
        "something.else": torch.zeros(1),
    })
    assert sorted(mapped) == ["adaptation.0.conv1.0.weight", "adaptation.1.conv2.1.running_var", "attention.1.mu_conv.1.bias"]
    assert unexpected == ["something.else"]


def test_converted_weights_equal_original(converted, official):
    import semcorr.modeling  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModel

    from semcorr.modeling import PMDStudentModel

    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= {p.name for p in converted.iterdir()}
    model = AutoModel.from_pretrained(converted)
    assert isinstance(model, PMDStudentModel)
    assert model.config.grid_align_corners and model.config.adaptation_kernel_sizes == [5, 3]
    assert model.config.attention_levels == [1] and model.config.soft_argmax_beta == 50
    state = model.state_dict()
    mapped, unexpected = map_official_keys(official)
    assert not unexpected and len(mapped) == len(official)
    for key, value in mapped.items():
        assert torch.equal(state[key], value), key


def test_pipeline_on_converted(converted):
    import semcorr.pipelines  # noqa: F401  (registers the task)
    from transformers import pipeline

    rng = np.random.default_rng(0)
    source = rng.integers(0, 255, (48, 56, 3), dtype=np.uint8)
    target = rng.integers(0, 255, (40, 72, 3), dtype=np.uint8)
    matcher = pipeline("semantic-correspondence", model=str(converted))
    result = matcher({"source_image": source, "target_image": target, "source_keypoints": [[10.0, 12.0], [40.0, 30.0]]})
    points = np.asarray(result["target_keypoints"])
    assert points.shape == (2, 2) and np.isfinite(points).all()
    assert (points >= 0).all() and (points[:, 0] <= 72).all() and (points[:, 1] <= 40).all()


def test_wrapped_dataparallel_and_split_layouts(tmp_path, official):
    from safetensors.torch import load_file

    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in official.items()}, "epoch": 3}, wrapped)
    split = tmp_path / "split.pt"
    torch.save({
        "state_dict1": {k[len("adap_layer_feat3."):]: v for k, v in official.items() if k.startswith("adap_layer_feat3.")},
        "state_dict2": {k[len("adap_layer_feat4."):]: v for k, v in official.items() if k.startswith("adap_layer_feat4.")},
        "chn4_dict": {k[len("chn4."):]: v for k, v in official.items() if k.startswith("chn4.")},
    }, split)
    mapped, _ = map_official_keys(official)
    for name, path in (("wrapped", wrapped), ("split", split)):
        out = convert_pmd_checkpoint(path, tmp_path / name, backbone_weights=None, config_overrides=OVERRIDES)
        saved = load_file(out / "model.safetensors")
        for key, value in mapped.items():
            assert torch.equal(saved[key], value), (name, key)


def test_missing_key(tmp_path, official):
    broken = dict(official)
    del broken["chn4.mu_conv.0.weight"]
    path = tmp_path / "missing.pt"
    torch.save(broken, path)
    with pytest.raises(ValueError, match=r"missing keys: attention\.1\.mu_conv\.0\.weight"):
        convert_pmd_checkpoint(path, tmp_path / "out", backbone_weights=None, config_overrides=OVERRIDES)
    assert not (tmp_path / "out").exists()


def test_wrong_shape_and_unexpected_key(tmp_path, official):
    broken = dict(official)
    broken["adap_layer_feat4.conv1.0.weight"] = torch.zeros(512, 512, 5, 5)
    broken["adap_layer_feat5.conv1.0.weight"] = torch.zeros(1)
    path = tmp_path / "shape.pt"
    torch.save(broken, path)
    with pytest.raises(ValueError) as info:
        convert_pmd_checkpoint(path, tmp_path / "out", backbone_weights=None, config_overrides=OVERRIDES)
    message = str(info.value)
    assert "adaptation.1.conv1.0.weight" in message
    assert "(512, 512, 5, 5)" in message and "(512, 512, 3, 3)" in message
    assert "unexpected keys: adap_layer_feat5.conv1.0.weight" in message


def test_bad_paths_and_files(tmp_path, official):
    with pytest.raises(ValueError, match="checkpoint not found"):
        convert_pmd_checkpoint(tmp_path / "nope.pt", tmp_path / "out", backbone_weights=None)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="could not read"):
        convert_pmd_checkpoint(garbage, tmp_path / "out", backbone_weights=None)
    good = tmp_path / "good.pt"
    torch.save(official, good)
    with pytest.raises(ValueError, match="backbone weights file not found"):
        convert_pmd_checkpoint(good, tmp_path / "out", backbone_weights=str(tmp_path / "missing.safetensors"),
                               config_overrides=OVERRIDES)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        convert_pmd_checkpoint(good, occupied, backbone_weights=None, config_overrides=OVERRIDES)
    assert (occupied / "keep.txt").read_text() == "x"


def test_cli_bad_input(tmp_path, capsys):
    code = main(["--checkpoint", str(tmp_path / "nope.pt"), "--output-dir", str(tmp_path / "out"), "--backbone-weights", "none"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: checkpoint not found") and "\n" not in err
