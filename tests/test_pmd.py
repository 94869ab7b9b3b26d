"""PMD teacher / student: Auto round trips, stochastic hypotheses, PSR / CAL terms by hand."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel

from semcorr.modeling import (
    PMDStudentConfig,
    PMDStudentModel,
    PMDTeacherConfig,
    PMDTeacherModel,
)
from semcorr.modeling.ops.geometry import identity_grid
from semcorr.modeling.pmd.losses import (
    keypoint_flow_loss,
    confidence_aware_loss,
    cycle_errors,
    cycle_mask,
    empirical_variance,
    flow_smoothness,
    psr_weights,
    update_prior,
    variance_kl,
)

from .conftest import TINY_PMD, cell_centres, grid_in_pixels, pixel_values, shifted_crops


@pytest.fixture(scope="module")
def pair():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 64, 64, generator=generator), torch.randn(2, 3, 64, 64, generator=generator)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return PMDTeacherModel(PMDTeacherConfig(**TINY_PMD)).eval()


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(1)
    return PMDStudentModel(PMDStudentConfig(**TINY_PMD)).eval()


def test_configs_register_and_validate():
    assert AutoConfig.for_model("semcorr-pmd-teacher").__class__ is PMDTeacherConfig
    assert AutoConfig.for_model("semcorr-pmd-student").__class__ is PMDStudentConfig
    published = PMDStudentConfig()
    assert published.backbone == "resnet101.tv_in1k" and published.backbone_layers == [3, 4]
    assert published.adaptation_kernel_sizes == [5, 3] and published.attention_levels == [1]
    assert published.image_size == [320, 320] and published.distillation_weight == 16.0
    with pytest.raises(ValueError, match="adaptation_kernel_sizes"):
        PMDStudentConfig(**TINY_PMD, adaptation_kernel_sizes=[4, 3])
    with pytest.raises(ValueError, match="attention_levels"):
        PMDStudentConfig(**TINY_PMD, attention_levels=[2])


@pytest.mark.parametrize("model_name", ["teacher", "student"])
def test_save_pretrained_round_trip_is_exact(model_name, pair, tmp_path, request):
    model = request.getfixturevalue(model_name)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    saved, restored = model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[key], restored[key]) for key in saved)  # the round trip itself is exact
    # Outputs may differ in the last float bits: oneDNN can pick another conv kernel for the
    # loaded tensors' memory layout or the current thread count.
    source, target = pair
    before, after = model.match(source, target), loaded.match(source, target)
    torch.testing.assert_close(before.grid_src_to_trg, after.grid_src_to_trg, atol=1e-6, rtol=0)
    torch.testing.assert_close(before.grid_trg_to_src, after.grid_trg_to_src, atol=1e-6, rtol=0)


def test_match_contract_shapes(student, pair):
    source, target = pair
    keypoints = torch.tensor([[[10.0, 12.0], [40.0, 50.0]], [[5.0, 5.0], [60.0, 3.0]]])
    output = student.match(source, target, source_keypoints=keypoints)
    assert output.grid_src_to_trg.shape == (2, 2, 8, 8) and output.grid_trg_to_src.shape == (2, 2, 8, 8)
    assert output.confidence.shape == (2, 8, 8)
    assert output.target_keypoints.shape == (2, 2, 2) and output.keypoint_scores.shape == (2, 2)


@pytest.mark.parametrize("kind, seed", [("student", 1), ("teacher", 0)])
def test_match_lands_on_a_planted_shift(kind, seed):
    """Fields in normalised units (x first, ``align_corners=False``) land where the construction says.

    Pair 0: the target is the source's texture moved 16 px (two cells) to the left; pair 1: identical
    images. A sharp soft-argmax (beta 1000) reads off the correlation's peak, so even random weights
    find the shift; with beta 50 random correlations are too flat and the field shrinks to the centre.
    """
    model_class, config_class = {"student": (PMDStudentModel, PMDStudentConfig),
                                 "teacher": (PMDTeacherModel, PMDTeacherConfig)}[kind]
    torch.manual_seed(seed)
    model = model_class(config_class(**TINY_PMD, soft_argmax_beta=1000.0)).eval()
    source, target = shifted_crops((64, 64), (64, 64), offset=(16, 0), seed=0)  # source (x, y) = target (x + 16, y)
    keypoints = torch.tensor([[[x, y] for y in (6.0, 21.5, 33.0, 50.0) for x in (3.0, 12.5, 27.0, 40.0)]])
    output = model.match(pixel_values(source, source), pixel_values(target, source), keypoints.repeat(2, 1, 1))
    xs, ys = cell_centres(8, 8, 8)
    forward_x, forward_y = grid_in_pixels(output.grid_src_to_trg, (64, 64))
    backward_x, backward_y = grid_in_pixels(output.grid_trg_to_src, (64, 64))
    # identical images: every cell onto itself, every keypoint onto itself (both directions)
    for x, y in ((forward_x[1], forward_y[1]), (backward_x[1], backward_y[1])):
        assert float(torch.hypot(x - xs, y - ys).max()) < 0.1
    assert float((output.target_keypoints[1] - keypoints[0]).norm(dim=-1).max()) < 0.1
    # shifted: the cells whose content is in the other image (random features fail at a few border cells)
    forward = torch.hypot(forward_x[0] - (xs + 16), forward_y[0] - ys)[xs + 16 < 64]
    backward = torch.hypot(backward_x[0] - (xs - 16), backward_y[0] - ys)[xs - 16 > 0]
    for errors in (forward, backward):
        assert float((errors < 0.5).float().mean()) >= 0.75, errors
        assert float(errors.median()) < 0.1
    transferred = (output.target_keypoints[0] - keypoints[0] - torch.tensor([16.0, 0.0])).norm(dim=-1)
    assert float((transferred < 0.5).float().mean()) >= 0.75, transferred


def test_teacher_hypotheses_are_stochastic_and_match_is_not(teacher, pair):
    source, target = pair
    forward, backward = teacher.sample_hypotheses(source, target, 4, generator=torch.Generator().manual_seed(0))
    assert forward.shape == (4, 2, 2, 8, 8) and backward.shape == (4, 2, 2, 8, 8)
    assert (forward[0] - forward[1]).abs().max() > 1e-4
    again, _ = teacher.sample_hypotheses(source, target, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(forward, again)
    assert torch.equal(teacher.match(source, target).grid_src_to_trg, teacher.match(source, target).grid_src_to_trg)


def test_teacher_loss_trains_adaptation_not_backbone(pair):
    torch.manual_seed(0)
    model = PMDTeacherModel(PMDTeacherConfig(**TINY_PMD)).train()
    source, target = pair
    output = model(source, target, grid_trg_to_src=identity_grid(2, 64, 64), valid_trg=torch.ones(2, 64, 64, dtype=torch.bool))
    assert set(output.losses) == {"grid", "smoothness", "kl"} and torch.isfinite(output.loss)
    output.loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.adaptation[0].conv1[0].weight.grad.abs().sum() > 0
    assert model.attention["1"].sigma_conv.weight.grad.abs().sum() > 0  # the distribution is trained


def test_teacher_hypotheses_carry_no_graph_even_in_train_mode(pair):
    """``sample_hypotheses`` runs without autograd: a trainable teacher in train mode returns plain
    tensors, and a loss built directly on them (no student, no CAL) cannot reach the teacher."""
    torch.manual_seed(0)
    model = PMDTeacherModel(PMDTeacherConfig(**TINY_PMD)).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is None for p in trainable)
    source, target = pair
    forward, backward = model.sample_hypotheses(source, target, 2, generator=torch.Generator().manual_seed(0))
    for hypotheses in (forward, backward):
        assert not hypotheses.requires_grad and hypotheses.grad_fn is None
    loss = (forward - identity_grid(2, 8, 8)).square().mean() + backward.square().mean()
    assert not loss.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        loss.backward()
    assert all(p.grad is None for p in model.parameters())


def test_gradients_reach_the_student_never_the_teacher(teacher, pair):
    source, target = pair
    forward, backward = teacher.sample_hypotheses(source, target, 3)
    torch.manual_seed(2)
    model = PMDStudentModel(PMDStudentConfig(**TINY_PMD)).train()
    output = model(source, target, hypotheses_src_to_trg=forward, hypotheses_trg_to_src=backward)
    output.loss.backward()
    assert model.adaptation[1].conv2[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert output.losses["psr_weights"].shape == (3, 2, 8, 8)


def test_plain_l2_ablation_weighs_every_hypothesis_alike(teacher, pair):
    """``distillation_loss="l2"``: the distillation term is the mean squared distance to every
    hypothesis (no PSR weights, no cycle mask) and the loss has no variance-KL term."""
    source, target = pair
    forward, backward = teacher.sample_hypotheses(source, target, 3, generator=torch.Generator().manual_seed(0))
    outputs = {}
    for loss in ("cal", "l2"):
        torch.manual_seed(2)
        model = PMDStudentModel(PMDStudentConfig(**TINY_PMD, distillation_loss=loss)).eval()
        prior = torch.full((2, 2, 8, 8), 0.05)  # makes PSR weights differ from 1
        with torch.no_grad():
            outputs[loss] = model(source, target, hypotheses_src_to_trg=forward, hypotheses_trg_to_src=backward,
                                  psr_prior=prior)
    l2, cal = outputs["l2"], outputs["cal"]
    assert torch.equal(l2.grid_src_to_trg, cal.grid_src_to_trg)  # same network, only the loss differs
    squared = ((forward - l2.grid_src_to_trg[None]) ** 2).sum(dim=2)
    assert float(l2.losses["distillation"]) == pytest.approx(float(squared.mean()), rel=1e-5)
    expected = 16 * squared.mean() + 0.5 * l2.smoothness
    assert float(l2.loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(l2.losses["objective"]) == pytest.approx(float(l2.loss), rel=1e-6)
    assert float(cal.losses["distillation"]) != pytest.approx(float(l2.losses["distillation"]), rel=1e-3)
    with pytest.raises(ValueError, match="distillation_loss"):
        PMDStudentConfig(**TINY_PMD, distillation_loss="l1")


def test_keypoint_loss_is_zero_for_a_perfect_field():
    grid = identity_grid(1, 8, 8)
    points = torch.tensor([[[4.0, 4.0], [20.0, 36.0]]])
    loss = keypoint_flow_loss(grid, points, points, None, (64, 64), (64, 64))
    assert float(loss) < 1e-6
    shifted = keypoint_flow_loss(grid, points + 8.0, points, None, (64, 64), (64, 64))
    assert float(shifted) == pytest.approx(math.hypot(0.25, 0.25), rel=1e-5)


# -- PSR and CAL by hand ------------------------------------------------------------------------
def test_psr_weights_by_hand():
    student = torch.zeros(1, 2, 1, 2)
    hypotheses = torch.tensor([[[[[0.1, 0.0]], [[0.0, 0.3]]]], [[[[0.0, 0.0]], [[0.2, 0.0]]]]])  # (2,1,2,1,2)
    prior = torch.full((1, 2, 1, 2), 0.5)
    weights = psr_weights(hypotheses, student, prior)
    expected = torch.tensor([[[[math.exp(-0.01 / 0.5), math.exp(-0.09 / 0.5)]]], [[[math.exp(-0.04 / 0.5), 1.0]]]])
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(empirical_variance(hypotheses, student)[0, :, 0], torch.tensor([[0.005, 0.0], [0.02, 0.045]]))


def test_prior_update_by_hand():
    prior = torch.ones(1, 2, 1, 1)
    variance = torch.tensor([0.0, 3.0]).view(1, 2, 1, 1)
    torch.testing.assert_close(update_prior(prior, variance, 0.01).flatten(), torch.tensor([0.99, 1.02]))


def test_cycle_mask_by_hand():
    errors = torch.tensor([0.0, 0.5, 1.0, 0.04]).view(4, 1, 1, 1)  # min 0, max 1 for this pair
    mask = cycle_mask(errors, 50.0, 0.08).flatten()
    expected = torch.tensor([1 - 1 / (1 + math.exp(-50 * (d - 0.08))) for d in (0.0, 0.5, 1.0, 0.04)])
    torch.testing.assert_close(mask, expected)


def test_cycle_errors_zero_for_inverse_fields():
    identity = identity_grid(1, 6, 6)[None]
    assert float(cycle_errors(identity, identity).abs().max()) < 1e-5
    shifted = identity + torch.tensor([0.2, 0.0]).view(1, 1, 2, 1, 1)
    errors = cycle_errors(shifted, identity)[..., :5]  # the last column lands past the border and is clamped
    assert torch.allclose(errors, torch.full_like(errors, 0.2), atol=1e-5)


def test_variance_kl_and_cal_by_hand():
    prior, variance = torch.tensor([2.0]), torch.tensor([1.0])
    assert float(variance_kl(prior, variance)) == pytest.approx(0.5 * (2 - 1 - math.log(2)), rel=1e-4)
    student = torch.zeros(1, 2, 1, 1, requires_grad=True)
    hypotheses = torch.tensor([0.3, 0.4]).view(1, 1, 2, 1, 1)  # |F_l - F_s|^2 = 0.25
    ones = torch.ones(1, 1, 1, 1)
    terms = confidence_aware_loss(hypotheses, student, ones, ones, torch.tensor(0.1), torch.ones(1, 2, 1, 1),
                                  torch.ones(1, 2, 1, 1), distillation_weight=16, smoothness_weight=0.5)
    assert float(terms["distillation"].detach()) == pytest.approx(0.25)
    assert float(terms["loss"].detach()) == pytest.approx(16 * 0.25 + 0.5 * 0.1, rel=1e-5)
    assert float(terms["objective"]) == pytest.approx(16 * 0.25 + 0.5 * 0.1, rel=1e-5)  # KL(Sigma=var) = 0


def test_smoothness_zero_for_identity_and_affine_fields():
    for align in (False, True):
        grid = identity_grid(1, 5, 7, align_corners=align)
        assert float(flow_smoothness(grid, align)) == 0.0
    bumpy = identity_grid(1, 5, 5)
    bumpy[0, 0, 2, 2] += 0.5
    assert float(flow_smoothness(bumpy)) > 0


def test_corner_aligned_transfer_reads_the_field_like_the_official_eval(pair):
    """Official PMD: upsample the cell field (align_corners=True), read it at the rounded pixel index,
    map back with (g + 1)(size - 1) / 2. Checked here against that recipe done literally."""
    torch.manual_seed(3)
    model = PMDStudentModel(PMDStudentConfig(**TINY_PMD, grid_align_corners=True)).eval()
    source, target = pair
    keypoints = torch.tensor([[[10.5, 12.5], [40.2, 50.7], [63.9, 0.1]], [[5.5, 5.5], [60.0, 3.0], [31.5, 31.5]]])
    output = model.match(source, target, source_keypoints=keypoints)
    dense = F.interpolate(output.grid_src_to_trg, size=(64, 64), mode="bilinear", align_corners=True)
    for b in range(2):
        for n in range(3):
            x = min(max(int(round(float(keypoints[b, n, 0]) - 0.5)), 0), 63)
            y = min(max(int(round(float(keypoints[b, n, 1]) - 0.5)), 0), 63)
            expected = (dense[b, :, y, x] + 1) * 63 / 2 + 0.5
            torch.testing.assert_close(output.target_keypoints[b, n], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kernel, bias", [(5, True), (3, False), (1, True)])
def test_conv2d_as_matmul_equals_conv2d(kernel, bias):
    from semcorr.modeling.pmd.layers import conv2d_as_matmul

    generator = torch.Generator().manual_seed(kernel)
    features = torch.randn(2, 6, 7, 9, generator=generator)
    weight = torch.randn(4, 6, kernel, kernel, generator=generator)
    offset = torch.randn(4, generator=generator) if bias else None
    expected = F.conv2d(features, weight, offset, padding=kernel // 2)
    torch.testing.assert_close(conv2d_as_matmul(features, weight, offset, kernel // 2), expected, rtol=1e-5, atol=1e-5)


def test_eval_adaptation_path_matches_training_convolution():
    from semcorr.modeling.pmd.layers import AdaptationBlock

    torch.manual_seed(0)
    block = AdaptationBlock(8, 5).eval()
    features = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        fast = block(features)
        reference = features + block.conv1(features)
        reference = reference + block.conv2(reference)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
