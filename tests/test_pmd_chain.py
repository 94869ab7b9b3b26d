"""The PMD chain on CPU (``semcorr.training.cpu_chain``): the teacher learns, its uncertainty is
informative, and the distilled student beats its starting point and keeps up with the teacher.

One chain run (about six minutes on one thread) is shared by the tests of this module, which are
``slow`` (``pytest -m slow``; the default run keeps the student's falling loss and keypoint fine-tuning): the
``pmd_cpu_tiny.yaml`` teacher (synthetic warps of scikit-image photos), its hypotheses on crop pairs
of those photos, and the ``pmd_cpu_tiny_student.yaml`` student (PSR + CAL). Held out from every
stage: the chelsea photo (synthetic warps) and the motorcycle stereo pair (real pairs with keypoints).
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from semcorr.hub_datasets.skimage_pairs import TRAINING_PHOTOS, skimage_data_dir
from semcorr.training.data.synthetic import SyntheticPairGenerator
from semcorr.training import cpu_chain, train_teacher

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chain(tmp_path_factory, datasets_offline_module):
    output = tmp_path_factory.mktemp("pmd-chain")
    results = cpu_chain.run_chain(output, losses=("cal",))
    return output, results


@pytest.fixture(scope="module")
def models(chain):
    import semcorr.modeling
    from transformers import AutoModel

    output, _ = chain
    config = train_teacher.TeacherConfig.load(cpu_chain.TEACHER_CONFIG, {"run.output_dir": str(output / "unused")})
    untrained = train_teacher.build_model(config.model, config.optim.seed).eval()
    trained = AutoModel.from_pretrained(output / "teacher" / "final").eval()
    assert isinstance(trained, semcorr.modeling.PMDTeacherModel)
    return untrained, trained


def held_out_pairs(model, flip_prob: float, seed: int = 123, count: int = 8) -> dict:
    """Synthetic warps of chelsea (never trained on), normalised for ``model``."""
    height, width = model.config.image_size
    image = Image.open(skimage_data_dir() / "chelsea.png").convert("RGB").resize((width, height), Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None].repeat(count, 1, 1, 1)
    pairs = SyntheticPairGenerator(seed=seed, flip_prob=flip_prob, jitter=None)(pixels)
    mean = torch.tensor(model.config.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(model.config.image_std).view(1, 3, 1, 1)
    for side in ("source", "target"):
        pairs[f"{side}_pixel_values"] = (pairs[f"{side}_pixel_values"] - mean) / std
    return pairs


def held_out_epe(model, flip_prob: float) -> float:
    """Mean end-point error (grid units) of ``grid_trg_to_src`` at valid target cells."""
    pairs = held_out_pairs(model, flip_prob)
    with torch.no_grad():
        output = model(pairs["source_pixel_values"], pairs["target_pixel_values"],
                       grid_trg_to_src=pairs["grid_trg_to_src"], valid_trg=pairs["valid_trg"])
    return output.losses["grid"].item()


def test_chain_keeps_its_held_out_images_out_of_training():
    config = yaml.safe_load(cpu_chain.TEACHER_CONFIG.read_text())
    photos = config["data"]["images"].removeprefix("skimage:").split(",")
    assert photos == list(TRAINING_PHOTOS)
    assert not {"chelsea.png", "motorcycle_left.png", "motorcycle_right.png"} & set(photos)


@pytest.mark.parametrize("flip_prob", [0.0, 0.5], ids=["plain-warps", "warps-with-flips"])
def test_teacher_learns_on_synthetic_warps(models, flip_prob):
    """The teacher's held-out end-point error falls by at least 30 % from the untrained model."""
    untrained, trained = models
    before, after = held_out_epe(untrained, flip_prob), held_out_epe(trained, flip_prob)
    print(f"held-out EPE (flip_prob {flip_prob}): untrained {before:.4f}, trained {after:.4f}")
    assert after <= 0.7 * before, (before, after)


def test_teacher_uncertainty_is_informative(models):
    """Cells in the top quartile of hypothesis spread have a larger mean error than the bottom quartile."""
    _, teacher = models
    pairs = held_out_pairs(teacher, flip_prob=0.0, seed=321)
    source, target = pairs["source_pixel_values"], pairs["target_pixel_values"]
    _, hypotheses = teacher.sample_hypotheses(source, target, 8, generator=torch.Generator().manual_seed(0))
    spread = hypotheses.std(dim=0).norm(dim=1)  # (B, h, w)
    with torch.no_grad():
        _, grid_trg_to_src, _, _ = teacher.predict(source, target)
    truth, valid = teacher._cell_targets(pairs["grid_trg_to_src"], pairs["valid_trg"], tuple(spread.shape[-2:]))
    error = (grid_trg_to_src - truth).norm(dim=1)[valid]
    spread = spread[valid]
    low, high = spread.quantile(0.25), spread.quantile(0.75)
    bottom, top = error[spread <= low].mean().item(), error[spread >= high].mean().item()
    print(f"mean error: bottom spread quartile {bottom:.4f}, top quartile {top:.4f}")
    assert top > 1.5 * bottom, (bottom, top)


def test_student_beats_its_start_and_keeps_up_with_the_teacher(chain):
    """On the held-out stereo windows: distilled > untrained student, and within 1 PCK point of the teacher."""
    output, results = chain
    pck = results["pck"]
    print(cpu_chain.format_results(results))
    for alpha in ("pck@0.05", "pck@0.1"):
        assert pck["student (cal)"][alpha] > pck["untrained student"][alpha] + 0.05, (alpha, pck)
        assert pck["student (cal)"][alpha] >= pck["teacher"][alpha] - 0.01, (alpha, pck)
    assert (output / "results.json").is_file()


def test_rerun_skips_finished_stages(chain, monkeypatch):
    output, results = chain
    from semcorr.training import distill_student, generate_hypotheses

    def fail(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    for module, name in ((train_teacher, "train"), (generate_hypotheses, "main"), (distill_student, "train")):
        monkeypatch.setattr(module, name, fail)
    again = cpu_chain.run_chain(output, losses=("cal",))
    assert again["pck"].keys() == results["pck"].keys()
    for name, scores in results["pck"].items():
        assert again["pck"][name] == pytest.approx(scores), name
