"""PMD teacher training entry point: config validation, outputs, resume, NaN stop, 2 processes, learning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from semcorr.modeling import PMDTeacherConfig
from semcorr.training import train_teacher
from semcorr.training.config import load_config

TINY_MODEL = dict(backbone="resnet18", backbone_weights=None, backbone_layers=[2, 3], image_size=[64, 64])


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from PIL import Image

    from tests.conftest import textured_image

    folder = tmp_path_factory.mktemp("images")
    for index in range(8):
        Image.fromarray(textured_image(48, 56, seed=index)).save(folder / f"img{index}.png")
    return folder


def write_config(path: Path, image_folder, output_dir, **sections) -> Path:
    raw = {
        "model": dict(TINY_MODEL),
        "data": {"images": str(image_folder), "color_jitter": False},
        "optim": {"lr": 1e-3, "batch_size": 2, "epochs": 1, "lr_milestones": [1], "seed": 0},
        "run": {"output_dir": str(output_dir), "save_every_steps": 2, "log_with": [], "num_threads": 1},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(raw))
    return path


def run_cli(*args, env=None, timeout=300):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "semcorr.training.train_teacher", *map(str, args)],
        capture_output=True, text=True, env=environment, timeout=timeout,
    )


# -- config ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "section, values, message",
    [
        ("optim", {"lrr": 1e-3}, r"optim\.lrr.*valid keys of 'optim'.*\blr\b"),
        ("model", {"backbon": "resnet18"}, r"model\.backbon.*backbone"),
        ("optim", {"batch_size": "16"}, r"optim\.batch_size must be int"),
        ("optim", {"lr": True}, r"optim\.lr must be float"),
        ("model", {"backbone_layers": [2.5, 3]}, r"model\.backbone_layers must be"),
        ("data", {"images": "/nonexistent/folder"}, r"data\.images: folder not found"),
        ("data", {"images": "skimage:astronaut.png,nope.png"}, r"nope\.png"),
    ],
)
def test_config_errors_before_any_work(tmp_path, image_folder, monkeypatch, section, values, message):
    config = write_config(tmp_path / "c.yaml", image_folder, tmp_path / "out", **{section: values})
    monkeypatch.setattr(train_teacher, "train", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(ValueError, match=message):
        load_config(config, PMDTeacherConfig)
    assert train_teacher.main(["--config", str(config)]) == 2
    assert not (tmp_path / "out").exists()


def test_unknown_section_and_published_configs(tmp_path, image_folder):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"optimizer": {"lr": 1}}))
    with pytest.raises(ValueError, match="unknown section.*optimizer.*valid sections"):
        load_config(path, PMDTeacherConfig)
    configs = Path(train_teacher.__file__).parent / "configs"
    tiny = load_config(configs / "pmd_cpu_tiny.yaml", PMDTeacherConfig)
    assert tiny.model["backbone_weights"] == "embedded" and tiny.model["image_size"] == [128, 128]
    # the published recipe (its data folder does not exist here: point it at ours)
    published = load_config(configs / "pmd_pf_pascal.yaml", PMDTeacherConfig, {"data.images": str(image_folder)})
    assert published.model["backbone"] == "resnet101.tv_in1k" and published.model["backbone_layers"] == [3, 4]
    assert published.model["image_size"] == [320, 320]
    assert (published.optim.lr, published.optim.batch_size, published.optim.epochs) == (3e-5, 16, 100)
    assert (published.optim.lr_milestones, published.optim.lr_gamma) == ([60], 0.2)


# -- a short run, resume -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, image_folder):
    root = tmp_path_factory.mktemp("run-a")
    config = write_config(root / "a.yaml", image_folder, root / "out")
    metrics = train_teacher.train(load_config(config, PMDTeacherConfig))  # 8 images / 2 = 4 steps
    return root / "out", metrics


def test_short_run_writes_final_and_checkpoints(uninterrupted):
    import semcorr.modeling  # noqa: F401
    from transformers import AutoImageProcessor, AutoModel

    out, metrics = uninterrupted
    assert metrics["steps"] == 4 and metrics["world_size"] == 1
    assert train_teacher.checkpoint_steps(out) == [2, 4]
    assert (out / "checkpoints" / "step-4" / "model.safetensors").is_file()
    model = AutoModel.from_pretrained(out / "final")
    assert type(model).__name__ == "PMDTeacherModel" and model.config.image_size == [64, 64]
    assert AutoImageProcessor.from_pretrained(out / "final").size == {"height": 64, "width": 64}
    card = (out / "final" / "README.md").read_text()
    assert "resnet18" in card and "train_loss" in card and str(out.parent) in card
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4]
    assert not list(out.glob(".tmp-*")) and not list((out / "checkpoints").glob(".tmp-*"))


def test_resume_equals_uninterrupted(tmp_path, image_folder, uninterrupted):
    out_a, _ = uninterrupted
    config = write_config(tmp_path / "b.yaml", image_folder, tmp_path / "out")
    first = run_cli("--config", config, "--max-steps", 2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert train_teacher.checkpoint_steps(tmp_path / "out") == [2]
    second = run_cli("--config", config, "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr and "at step 2" in second.stdout + second.stderr
    weights_a = load_file(out_a / "final" / "model.safetensors")
    weights_b = load_file(tmp_path / "out" / "final" / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        torch.testing.assert_close(weights_b[name], weights_a[name], rtol=0, atol=1e-6, msg=name)


def test_non_finite_loss_stops_naming_the_step(tmp_path, image_folder, monkeypatch):
    from semcorr.modeling import PMDTeacherModel

    original, calls = PMDTeacherModel.forward, []

    def forward(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(PMDTeacherModel, "forward", forward)
    config = load_config(write_config(tmp_path / "c.yaml", image_folder, tmp_path / "out"), PMDTeacherConfig)
    with pytest.raises(train_teacher.NonFiniteLossError, match=r"step 3\b.*step-2"):
        train_teacher.train(config)
    assert train_teacher.checkpoint_steps(tmp_path / "out") == [2]  # the bad step 3 was not saved
    assert not (tmp_path / "out" / "final").exists()


def test_unreadable_images_stop_the_run(tmp_path, image_folder):
    import shutil

    folder = tmp_path / "images"
    shutil.copytree(image_folder, folder)
    (folder / "broken.png").write_bytes(b"not a png")
    config = write_config(tmp_path / "c.yaml", folder, tmp_path / "out", optim={"max_steps": 4})
    result = run_cli("--config", config)
    assert result.returncode == 1
    assert "1 of" in result.stdout + result.stderr and "could not be read" in result.stderr and "broken.png" in result.stderr


# -- two processes ---------------------------------------------------------------------------------
def test_two_cpu_processes_match_one(tmp_path, image_folder):
    # global batch 4 (2 per process: the attention's batch norm needs 2), 2 epochs of 2 steps
    settings = dict(optim={"batch_size": 4, "epochs": 2})
    train_teacher.train(load_config(write_config(tmp_path / "one.yaml", image_folder, tmp_path / "one", **settings),
                                    PMDTeacherConfig))
    out_one = tmp_path / "one"
    config = write_config(tmp_path / "c.yaml", image_folder, tmp_path / "out", **settings)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "semcorr.training.train_teacher", "--config", str(config)],
        capture_output=True, text=True, env=environment, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # one writer, not one per process
    assert all(r["world_size"] == 2 and r["per_process_batch_size"] == 2 for r in steps)
    assert train_teacher.checkpoint_steps(out) == [2, 4]
    assert sorted(p.name for p in (out / "checkpoints" / "step-4").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    assert len(list((out / "checkpoints" / "step-4").glob("model*.safetensors"))) == 1
    # The same global batches, split over the processes ...
    steps_one = [r for r in map(json.loads, (out_one / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r]
    assert [r["data_fingerprint"] for r in steps] == [r["data_fingerprint"] for r in steps_one]
    # ... and the same loss up to what cannot be shared on CPU: batch-norm statistics are per process
    # (SyncBatchNorm needs a GPU) and the gate noise is drawn per process. First step: same weights.
    assert steps[0]["train/grid"] == pytest.approx(steps_one[0]["train/grid"], rel=0.15)
    assert steps[0]["train/loss"] == pytest.approx(steps_one[0]["train/loss"], rel=0.25)


# -- learning --------------------------------------------------------------------------------------
def held_out_epe(model, flip_prob: float, seed: int = 123, count: int = 8) -> float:
    """Mean end-point error (grid units, valid target cells) on warps of chelsea (never trained on)."""
    from semcorr.hub_datasets.skimage_pairs import skimage_data_dir
    from semcorr.hub_datasets.synthetic import SyntheticPairGenerator

    size = tuple(model.config.image_size)
    image = train_teacher.ImageSource.__new__(train_teacher.ImageSource)
    image._reader, image.image_size, image.items = (lambda i: __import__("PIL.Image").Image.open(
        skimage_data_dir() / "chelsea.png").convert("RGB")), size, ["chelsea.png"]
    pixels = image.read(0)[None].repeat(count, 1, 1, 1)
    pairs = SyntheticPairGenerator(seed=seed, flip_prob=flip_prob, jitter=None)(pixels)
    mean = torch.tensor(model.config.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(model.config.image_std).view(1, 3, 1, 1)
    model.eval()
    with torch.no_grad():
        output = model((pairs["source_pixel_values"] - mean) / std, (pairs["target_pixel_values"] - mean) / std,
                       grid_trg_to_src=pairs["grid_trg_to_src"], valid_trg=pairs["valid_trg"])
    return output.losses["grid"].item()


def test_teacher_learns_on_synthetic_warps(tmp_path):
    """A short CPU run of the tiny config lowers the held-out EPE (warps incl. flips) by >= 30 %."""
    import semcorr.modeling  # noqa: F401
    from transformers import AutoModel

    configs = Path(train_teacher.__file__).parent / "configs"
    config = load_config(configs / "pmd_cpu_tiny.yaml", PMDTeacherConfig,
                         {"run.output_dir": str(tmp_path / "out"), "run.log_with": [], "run.save_every_steps": 0})
    untrained = train_teacher.build_model(config.model, config.optim.seed)
    before = {flip: held_out_epe(untrained, flip) for flip in (0.0, 0.5)}
    train_teacher.train(config)
    trained = AutoModel.from_pretrained(tmp_path / "out" / "final")
    after = {flip: held_out_epe(trained, flip) for flip in (0.0, 0.5)}
    print("held-out EPE before", before, "after", after)
    assert after[0.5] <= 0.7 * before[0.5], (before, after)
    assert after[0.0] <= before[0.0] * 1.1, (before, after)  # unflipped pairs do not get worse
