"""The embedded EfficientNet-Lite0 weights, their cache, and loading user backbone weights."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from semcorr.modeling import EMBEDDED_BACKBONE, FeatureBackbone, embedded_state_dict, load_backbone_weights
from semcorr.modeling import embedded_backbone

EGYPTIAN_CAT = 285


def test_embedded_weights_classify_chelsea_as_egyptian_cat(chelsea):
    state = embedded_state_dict()
    assert len(state) == 296
    classifier = timm.create_model(EMBEDDED_BACKBONE, pretrained=False)
    classifier.load_state_dict(state, strict=True)
    classifier.eval()
    image = np.asarray(chelsea.resize((224, 224), Image.BILINEAR), dtype=np.float32) / 255.0
    pixels = torch.from_numpy((image - 0.5) / 0.5).permute(2, 0, 1)[None]
    with torch.no_grad():
        probabilities = classifier(pixels).softmax(-1)[0]
    assert probabilities.argmax().item() == EGYPTIAN_CAT
    assert probabilities[EGYPTIAN_CAT].item() > 0.3


def test_embedded_weights_are_cached_as_safetensors_and_reused(semcorr_cache, monkeypatch):
    first = embedded_state_dict()
    cached = semcorr_cache / "tf_efficientnet_lite0.in1k.safetensors"
    assert cached.is_file()
    assert embedded_backbone.embedded_weights_file() == cached

    def no_package():
        raise AssertionError("the package checkpoint must not be read again once the cache exists")

    monkeypatch.setattr(embedded_backbone, "_package_checkpoint", no_package)
    second = embedded_state_dict()
    assert list(second) == list(first)
    assert all(torch.equal(second[key], first[key]) for key in first)


def test_embedded_conversion_runs_when_cache_is_empty(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMCORR_CACHE", str(tmp_path / "fresh"))
    calls = []
    original = embedded_backbone._package_checkpoint

    def counting():
        calls.append(1)
        return original()

    monkeypatch.setattr(embedded_backbone, "_package_checkpoint", counting)
    state = embedded_state_dict()
    assert calls == [1]
    assert (tmp_path / "fresh" / "tf_efficientnet_lite0.in1k.safetensors").is_file()
    assert not list((tmp_path / "fresh").glob("*.tmp"))  # written atomically, no leftovers
    reference = timm.create_model(EMBEDDED_BACKBONE, pretrained=False).state_dict()
    assert list(state) == list(reference)
    assert all(state[key].shape == reference[key].shape for key in reference)


def test_embedded_feature_backbone_loads_and_gives_strides_4_8_16():
    backbone = FeatureBackbone(EMBEDDED_BACKBONE, [1, 2, 3])
    before = backbone.body.state_dict()["conv_stem.weight"].clone()
    load_backbone_weights(backbone, "embedded")
    after = backbone.body.state_dict()["conv_stem.weight"]
    assert not torch.equal(before, after)
    assert torch.equal(after, embedded_state_dict()["conv_stem.weight"])
    assert backbone.channels == [24, 40, 112] and backbone.reductions == [4, 8, 16]
    features = backbone(torch.zeros(1, 3, 64, 96))
    assert [tuple(f.shape) for f in features] == [(1, 24, 16, 24), (1, 40, 8, 12), (1, 112, 4, 6)]


def test_frozen_backbone_stays_in_eval_without_gradients():
    frozen = FeatureBackbone("resnet18", [1, 2])
    frozen.train()
    assert not frozen.body.training and not any(m.training for m in frozen.body.modules())
    assert not any(p.requires_grad for p in frozen.parameters())
    assert all(not f.requires_grad for f in frozen(torch.randn(1, 3, 32, 32, requires_grad=True)))
    trainable = FeatureBackbone("resnet18", [1, 2], frozen=False).train()
    assert trainable.body.training and all(p.requires_grad for p in trainable.parameters())
    assert all(f.requires_grad for f in trainable(torch.randn(2, 3, 32, 32)))
    assert trainable.channels == [64, 128] and trainable.reductions == [4, 8]


def test_embedded_weights_refused_for_another_backbone():
    with pytest.raises(ValueError, match="embedded weights are for 'tf_efficientnet_lite0'"):
        load_backbone_weights(FeatureBackbone("resnet18", [1, 2]), "embedded")


@pytest.mark.parametrize("suffix", [".pth", ".bin"])
def test_load_backbone_weights_refuses_pickled_checkpoints(tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="only safetensors"):
        load_backbone_weights(FeatureBackbone("resnet18", [1, 2]), path)


def test_load_backbone_weights_refuses_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_backbone_weights(FeatureBackbone("resnet18", [1, 2]), tmp_path / "absent.safetensors")


def test_load_backbone_weights_from_full_timm_safetensors(tmp_path):
    torch.manual_seed(11)
    full = timm.create_model("resnet18", pretrained=False)
    with torch.no_grad():  # make BN statistics non-trivial so a skipped load would show
        for module in full.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, path)

    torch.manual_seed(99)
    backbone = FeatureBackbone("resnet18", [1, 2]).eval()
    load_backbone_weights(backbone, str(path))
    reference = timm.create_model(
        "resnet18", pretrained=True, features_only=True, out_indices=(1, 2), pretrained_cfg_overlay={"file": str(path)}
    ).eval()
    assert torch.equal(backbone.body.state_dict()["conv1.weight"], full.state_dict()["conv1.weight"])
    assert torch.equal(backbone.body.state_dict()["layer2.0.bn1.running_var"], full.state_dict()["layer2.0.bn1.running_var"])
    pixels = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        ours, theirs = backbone(pixels), reference(pixels)
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
