"""The cascaded MIL training task: class data (folders, datasets, faults), pairing by class, outputs,
resume and two processes. What it learns is in test_cascaded_mil_learning.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from semcorr.training import train_cascaded_mil as tm
from semcorr.training.checkpoints import checkpoint_steps
from semcorr.training.data.class_pairs import class_images, class_pairs
from tests.conftest import textured_image, torchrun_module
from tests.test_cascaded_mil_model import TINY_MIL


def write_classes(root: Path, sizes: dict[str, int]) -> Path:
    """An ImageNet-layout folder: ``sizes[name]`` shifted crops of one texture per class."""
    for index, (name, count) in enumerate(sizes.items()):
        (root / name).mkdir(parents=True)
        texture = textured_image(96, 96, seed=index)
        for member in range(count):
            dx, dy = (member * 7) % 24, (member * 5) % 24
            Image.fromarray(texture[dy:dy + 64, dx:dx + 64]).save(root / name / f"{member}.JPEG")
    return root


@pytest.fixture(scope="module")
def classes(tmp_path_factory):
    return write_classes(tmp_path_factory.mktemp("imagenet"), {"n001": 4, "n002": 4, "n003": 3, "n004": 1})


def write_config(path: Path, images, output_dir, **sections) -> Path:
    raw = {"model": dict(TINY_MIL), "data": {"images": str(images)},
           "optim": {"lr": 1e-3, "batch_size": 2, "epochs": 2, "lr_milestones": [], "seed": 0},
           "run": {"output_dir": str(output_dir), "save_every_steps": 2, "log_with": [], "num_threads": 1}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(raw))
    return path


# -- data ------------------------------------------------------------------------------------------
def test_pairs_use_each_image_once_per_epoch_and_skip_lonely_classes(classes):
    images = class_images(classes)
    assert images.class_names == ["n001", "n002", "n003", "n004"] and images.class_sizes() == [4, 4, 3, 1]
    pairs, skipped = class_pairs(images.labels, seed=0, epoch=0)
    assert skipped == 1 and len(pairs) == 2 + 2 + 1  # n003's third image waits; n004 has no partner
    used = [image for pair in pairs for image in pair]
    assert len(used) == len(set(used)) and all(images.labels[a] == images.labels[b] for a, b in pairs)
    assert class_pairs(images.labels, 0, 0) == (pairs, skipped)  # seeded
    assert class_pairs(images.labels, 0, 1)[0] != pairs and len(class_pairs(images.labels, 0, 1)[0]) == 5


def test_a_dataset_with_a_class_column_and_one_without(tmp_path):
    import datasets

    pictures = [Image.fromarray(textured_image(32, 32, seed=i)) for i in range(4)]
    labelled = datasets.Dataset.from_dict({"image": pictures, "label": [0, 0, 1, 1]},
                                          features=datasets.Features({"image": datasets.Image(),
                                                                      "label": datasets.ClassLabel(names=["a", "b"])}))
    images = class_images(labelled)
    assert images.class_names == ["a", "b"] and images.labels == [0, 0, 1, 1] and images.read(2).size == (32, 32)
    unlabelled = datasets.Dataset.from_dict({"image": pictures, "caption": list("wxyz")},
                                            features=datasets.Features({"image": datasets.Image(),
                                                                        "caption": datasets.Value("string")}))
    with pytest.raises(ValueError, match=r"no class column; its columns are \['image', 'caption'\].*data\.class_column"):
        class_images(unlabelled)
    unlabelled.save_to_disk(str(tmp_path / "saved"))
    config = write_config(tmp_path / "c.yaml", tmp_path, tmp_path / "out")
    raw = yaml.safe_load(config.read_text())
    raw["data"] = {"dataset": str(tmp_path / "saved")}
    config.write_text(yaml.safe_dump(raw))
    assert tm.main(["--config", str(config)]) == 2  # fails before any work
    assert not (tmp_path / "out").exists()


def test_unreadable_images_are_counted_and_stop_the_run_above_one_percent(tmp_path, classes):
    import shutil

    folder = tmp_path / "classes"
    shutil.copytree(classes, folder)
    (folder / "n001" / "broken.JPEG").write_bytes(b"not a jpeg")
    result = tm.main(["--config", str(write_config(tmp_path / "c.yaml", folder, tmp_path / "out")), "--max-steps", "3"])
    assert result == 1  # 1 broken image of the epoch's 10: more than 1 %


# -- a short run ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, classes):
    root = tmp_path_factory.mktemp("mil-run")
    metrics = tm.train(tm.CascadedMILTrainConfig.load(write_config(root / "a.yaml", classes, root / "out")))
    return root / "out", metrics


def test_short_run_writes_final_card_and_metrics(uninterrupted):
    import semcorr.modeling  # noqa: F401
    from transformers import AutoModel

    out, metrics = uninterrupted
    assert metrics["steps"] == 4 and metrics["pairs_per_epoch"] == 5 and metrics["classes_skipped"] == 1
    model = AutoModel.from_pretrained(out / "final")
    assert type(model).__name__ == "CascadedMILModel" and model.config.num_region_pairs == 3
    card = (out / "final" / "README.md").read_text()
    for fact in ("stages: image, region, pixel", "shared attention: False", "RHM: True (L = 5)", "cascaded-mil"):
        assert fact in card, fact
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for record in steps:  # the logged loss is the weighted sum of the stages' terms (weights 1)
        assert record["train/loss"] == pytest.approx(record["train/image"] + record["train/region"] + record["train/pixel"],
                                                     rel=1e-5)


def test_resume_equals_uninterrupted(tmp_path, classes, uninterrupted):
    config = write_config(tmp_path / "b.yaml", classes, tmp_path / "out")
    assert tm.main(["--config", str(config), "--max-steps", "2"]) == 0
    assert checkpoint_steps(tmp_path / "out") == [2]
    assert tm.main(["--config", str(config), "--resume"]) == 0
    expected, resumed = load_file(uninterrupted[0] / "final" / "model.safetensors"), load_file(
        tmp_path / "out" / "final" / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=1e-6, msg=name)


def test_two_cpu_processes_run_the_same_pairs(tmp_path, classes):
    config = write_config(tmp_path / "c.yaml", classes, tmp_path / "out", optim={"batch_size": 4, "epochs": 1})
    result = torchrun_module("semcorr.training.train_cascaded_mil", "--config", config, nproc=2, port=29541)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in steps] == [1] and steps[0]["world_size"] == 2 and steps[0]["per_process_batch_size"] == 2
    assert len(list((tmp_path / "out" / "final").glob("model*.safetensors"))) == 1


def test_non_finite_loss_stops_naming_the_step(tmp_path, classes, monkeypatch):
    from semcorr.modeling import CascadedMILModel

    original = CascadedMILModel.forward

    def forward(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(CascadedMILModel, "forward", forward)
    config = tm.CascadedMILTrainConfig.load(write_config(tmp_path / "c.yaml", classes, tmp_path / "out"))
    with pytest.raises(tm.TrainingError, match=r"non-finite loss at step 1\b"):
        tm.train(config)


def test_published_and_tiny_configs_parse(tmp_path, classes):
    tiny = tm.CascadedMILTrainConfig.load("cascaded_mil_cpu_tiny.yaml", {"data.images": str(classes)})
    assert tiny.model["backbone_weights"] == "embedded" and tiny.optim.batch_size == 4
    published = tm.CascadedMILTrainConfig.load("cascaded_mil_imagenet.yaml", {"data.images": str(classes)})
    assert published.model["backbone"].startswith("vit_base_patch16") and published.model["image_size"] == [512, 512]
    assert (published.optim.optimizer, published.optim.lr, published.optim.momentum) == ("sgd", 3e-5, 0.9)
    assert published.optim.batch_size == 32  # 4 per GPU x 8 GPUs
