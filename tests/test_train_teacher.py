"""PMD teacher training entry point: config validation, outputs, resume, NaN stop, 2 processes (learning: test_pmd_chain)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from semcorr.training import train_teacher

from .conftest import TINY_PMD, run_module, torchrun_module


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from PIL import Image

    from .conftest import textured_image

    folder = tmp_path_factory.mktemp("images")
    for index in range(8):
        Image.fromarray(textured_image(48, 56, seed=index)).save(folder / f"img{index}.png")
    return folder


def write_config(path: Path, image_folder, output_dir, **sections) -> Path:
    raw = {
        "model": dict(TINY_PMD),
        "data": {"images": str(image_folder), "color_jitter": False},
        "optim": {"lr": 1e-3, "batch_size": 2, "epochs": 1, "lr_milestones": [1], "seed": 0},
        "run": {"output_dir": str(output_dir), "save_every_steps": 2, "log_with": [], "num_threads": 1},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(raw))
    return path


def run_cli(*args, env=None, timeout=300):
    return run_module("semcorr.training.train_teacher", *args, env=env, timeout=timeout)


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
        ("data", {"keypoint_dataset": "pf-pascal"}, r"needs data\.keypoint_data_dir"),
        ("data", {"keypoint_dataset": "/nonexistent/pairs"}, r"neither a benchmark"),
    ],
)
def test_config_errors_before_any_work(tmp_path, image_folder, monkeypatch, section, values, message):
    config = write_config(tmp_path / "c.yaml", image_folder, tmp_path / "out", **{section: values})
    monkeypatch.setattr(train_teacher, "train", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(ValueError, match=message):
        train_teacher.TeacherConfig.load(config)
    assert train_teacher.main(["--config", str(config)]) == 2
    assert not (tmp_path / "out").exists()


def test_unknown_section_and_published_configs(tmp_path, image_folder):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"optimizer": {"lr": 1}}))
    with pytest.raises(ValueError, match="unknown section.*optimizer.*valid sections"):
        train_teacher.TeacherConfig.load(path)
    configs = Path(train_teacher.__file__).parent / "configs"
    tiny = train_teacher.TeacherConfig.load(configs / "pmd_cpu_tiny.yaml")
    assert tiny.model["backbone_weights"] == "embedded" and tiny.model["image_size"] == [256, 256]
    # the published recipe (its data folder does not exist here: point it at ours)
    published = train_teacher.TeacherConfig.load(configs / "pmd_pf_pascal.yaml", {"data.images": str(image_folder)})
    assert published.model["backbone"] == "resnet101.tv_in1k" and published.model["backbone_layers"] == [3, 4]
    assert published.model["image_size"] == [320, 320]
    assert (published.optim.lr, published.optim.batch_size, published.optim.epochs) == (3e-5, 16, 100)
    assert (published.optim.lr_milestones, published.optim.lr_gamma) == ([60], 0.2)


# -- a short run, resume -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, image_folder):
    root = tmp_path_factory.mktemp("run-a")
    config = write_config(root / "a.yaml", image_folder, root / "out")
    metrics = train_teacher.train(train_teacher.TeacherConfig.load(config))  # 8 images / 2 = 4 steps
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


def test_logged_loss_is_the_weighted_sum_of_its_logged_terms(uninterrupted):
    """Each step's logged loss is grid + smoothness_weight x smoothness + kl_weight x KL, with the
    weights the run saved in final/config.json (a term left out of, or added to, the optimised loss fails)."""
    out, _ = uninterrupted
    config = json.loads((out / "final" / "config.json").read_text())
    smoothness_weight, kl_weight = config["smoothness_weight"], config["kl_weight"]
    assert (smoothness_weight, kl_weight) == (0.5, 1e-3)  # the defaults this run used
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r]
    assert len(steps) == 4
    for r in steps:
        assert r["train/grid"] > 0 and r["train/smoothness"] > 0 and r["train/kl"] > 0  # every term is present
        expected = r["train/grid"] + smoothness_weight * r["train/smoothness"] + kl_weight * r["train/kl"]
        assert r["train/loss"] == pytest.approx(expected, rel=1e-5), r


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
    config = train_teacher.TeacherConfig.load(write_config(tmp_path / "c.yaml", image_folder, tmp_path / "out"))
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
    train_teacher.train(train_teacher.TeacherConfig.load(
        write_config(tmp_path / "one.yaml", image_folder, tmp_path / "one", **settings)))
    out_one = tmp_path / "one"
    config = write_config(tmp_path / "c.yaml", image_folder, tmp_path / "out", **settings)
    result = torchrun_module("semcorr.training.train_teacher", "--config", config, nproc=2, port=29517)
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


# -- strong supervision ----------------------------------------------------------------------------
def test_keypoint_dataset_adds_the_sparse_term(tmp_path, image_folder, datasets_offline):
    """--keypoint-dataset: each step also trains on labelled PF-PASCAL pairs (logged train/keypoints)."""
    from tests.fixtures_benchmarks import write_pf_pascal

    pascal = write_pf_pascal(tmp_path / "pascal")
    config = write_config(tmp_path / "k.yaml", image_folder, tmp_path / "out", optim={"max_steps": 2})
    assert train_teacher.main(["--config", str(config), "--keypoint-dataset", "pf-pascal",
                               "--keypoint-data-dir", str(pascal)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    # The keypoint term enters the step's loss with model.keypoint_weight: the same first step (same
    # weights, batches and gate noise) with weight 3 instead of 1 has the same terms and a loss larger
    # by exactly 2 x the logged keypoint term.
    heavier = write_config(tmp_path / "k3.yaml", image_folder, tmp_path / "out3", optim={"max_steps": 1},
                           model={"keypoint_weight": 3.0})
    assert train_teacher.main(["--config", str(heavier), "--keypoint-dataset", "pf-pascal",
                               "--keypoint-data-dir", str(pascal)]) == 0
    first = next(r for r in map(json.loads, (tmp_path / "out3" / "metrics.jsonl").read_text().splitlines())
                 if "train/loss" in r)
    assert first["step"] == 1 and steps[0]["train/keypoints"] > 1e-3  # a real term, not a zero that cancels
    for term in ("train/keypoints", "train/grid", "train/smoothness", "train/kl"):
        assert first[term] == pytest.approx(steps[0][term], rel=1e-5), term
    assert first["train/loss"] - steps[0]["train/loss"] == pytest.approx(2 * steps[0]["train/keypoints"], rel=1e-4)


def test_keypoint_rows_cover_every_pair_each_pass():
    from semcorr.training.data.keypoint_pairs import keypoint_rows

    first_pass = np.concatenate([keypoint_rows(10, 4, 0, step) for step in range(2)])
    assert len(set(first_pass.tolist())) == 8
    assert np.array_equal(keypoint_rows(10, 4, 0, 1), keypoint_rows(10, 4, 0, 1))
    assert not np.array_equal(keypoint_rows(10, 4, 0, 0), keypoint_rows(10, 4, 0, 2))  # a new permutation


def test_bare_config_names_resolve_to_the_shipped_configs(tmp_path, monkeypatch, capsys):
    from semcorr.training.config import read_config_file

    monkeypatch.chdir(tmp_path)  # no such file here: the packaged one is used
    for name in ("pmd_cpu_tiny.yaml", "pmd_cpu_tiny"):
        raw, path = read_config_file(name)
        assert path == Path(train_teacher.__file__).parent / "configs" / "pmd_cpu_tiny.yaml"
        assert raw["model"]["backbone_weights"] == "embedded"
    with pytest.raises(ValueError, match=r"config file not found: nope\.yaml.*pmd_cpu_tiny_student\.yaml"):
        read_config_file("nope.yaml")
    assert train_teacher.main(["--config", "nope.yaml"]) == 2
    assert "configs shipped with semcorr" in capsys.readouterr().err


def test_published_student_configs_parse(tmp_path):
    from semcorr.training.distill_student import DistillConfig

    (tmp_path / "index.json").write_text("{}")
    tiny = DistillConfig.load("pmd_cpu_tiny_student.yaml", {"data.hypotheses": str(tmp_path)})
    assert tiny.model == {"distillation_loss": "cal"} and tiny.optim.batch_size == 4
    paper = DistillConfig.load("pmd_pf_pascal_student.yaml", {"data.hypotheses": str(tmp_path)})
    assert (paper.optim.lr, paper.optim.batch_size, paper.optim.epochs) == (3e-5, 16, 100)
    assert (paper.optim.lr_milestones, paper.optim.lr_gamma, paper.data.flip_prob) == ([60], 0.2, 0.5)
    assert paper.model["distillation_weight"] == 16.0 and paper.model["psr_prior_rate"] == 0.01


def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path, image_folder):
    """SIGKILL right after the first checkpoint (possibly while the next is being written), then --resume."""
    import signal
    import time

    settings = dict(optim={"epochs": 3}, run={"save_every_steps": 2, "num_threads": 1})
    reference = train_teacher.TeacherConfig.load(write_config(tmp_path / "ref.yaml", image_folder, tmp_path / "ref", **settings))
    train_teacher.train(reference)
    config = write_config(tmp_path / "k.yaml", image_folder, tmp_path / "out", **settings)
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "semcorr.training.train_teacher", "--config", str(config)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment)
    deadline = time.time() + 300
    while not train_teacher.checkpoint_steps(tmp_path / "out") and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    saved = train_teacher.checkpoint_steps(tmp_path / "out")
    assert saved and saved[-1] < 12 and not (tmp_path / "out" / "final").exists(), saved  # killed mid-run
    resumed = run_cli("--config", config, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {saved[-1]}" in resumed.stdout + resumed.stderr
    expected = load_file(tmp_path / "ref" / "final" / "model.safetensors")
    weights = load_file(tmp_path / "out" / "final" / "model.safetensors")
    assert expected.keys() == weights.keys()
    for name in expected:
        torch.testing.assert_close(weights[name], expected[name], rtol=0, atol=1e-6, msg=name)


def test_init_from_fine_tunes_a_trained_teacher(tmp_path, image_folder, uninterrupted):
    """--init-from starts from a teacher's weights (a tiny lr keeps them); a misfit or a student refuses."""
    trained, _ = uninterrupted
    config = write_config(tmp_path / "f.yaml", image_folder, tmp_path / "out", optim={"max_steps": 1, "lr": 1e-12})
    assert train_teacher.main(["--config", str(config), "--init-from", str(trained / "final")]) == 0
    start = load_file(trained / "final" / "model.safetensors")
    tuned = load_file(tmp_path / "out" / "final" / "model.safetensors")
    name = "adaptation.0.conv1.0.weight"
    torch.testing.assert_close(tuned[name], start[name], rtol=0, atol=1e-6)
    fresh = train_teacher.build_model(dict(TINY_PMD), 0).state_dict()[name]
    assert not torch.allclose(fresh, start[name])
    other = write_config(tmp_path / "o.yaml", image_folder, tmp_path / "o", model={"backbone_layers": [3, 4]})
    with pytest.raises(ValueError, match="does not fit this teacher"):
        train_teacher.train(train_teacher.TeacherConfig.load(other, {"run.init_from": str(trained / "final")}))
    with pytest.raises(ValueError, match="no model.safetensors"):
        train_teacher.TeacherConfig.load(config, {"run.init_from": str(tmp_path)})
