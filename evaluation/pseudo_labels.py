"""How good are a pseudo-label generator's labels? Measured on warps with known correspondence.

No labelled cross-instance data exists offline, so the checks of the cascaded MIL generator use
image pairs whose correspondence is known by construction: a photo and a random warp of it (the
"class" of a photo is the set of its warps). The warp is used only to measure, never to train.

* :func:`warped_pairs` -- held-out pairs (photo, warp) or (warp, warp) with the dense ground truth.
  The close-loop check needs the second kind: its loops go through third warps of the photo, and a
  leg between two warps is harder than one from the unwarped photo, so with (photo, warp) pairs the
  detour is noisier than the label it checks (measured for the tiny CPU generator: Spearman 0.0-0.1
  per label there, 0.3 with pairs of two warps).
* :func:`label_accuracy` -- PCK of the pairs a stage selects (PMPS) against the true warp.
* :func:`image_level_scores` -- the image-level AP of positive pairs (two warps of one photo) and
  negative pairs (warps of two photos).
* :func:`consistency_ranking` -- Spearman correlation between the close-loop consistency score of
  each label and its true error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class WarpedPairs:
    """Pairs with known correspondence, normalised for one model.

    Attributes:
        source, target: ``(P, 3, H, W)`` normalised pixel values; ``classes`` ``(P,)`` the photo of each pair.
        grid_src_to_trg: ``(P, 2, H, W)`` where each source pixel lands (grid units); ``valid_src`` ``(P, H, W)``.
    """

    source: torch.Tensor
    target: torch.Tensor
    classes: torch.Tensor
    grid_src_to_trg: torch.Tensor
    valid_src: torch.Tensor

    def __len__(self) -> int:
        return len(self.source)


def warped_pairs(model, photos, per_photo: int = 4, strength: float = 0.35, seed: int = 123,
                 both_warped: bool = False) -> WarpedPairs:
    """``per_photo`` pairs of every photo of scikit-image's data folder in ``photos``, at the model's
    input size (warps: :func:`~semcorr.hub_datasets.skimage_pairs.warp_generator`).

    A pair is the photo and a random warp of it, or with ``both_warped`` two random warps of it (two
    members of the photo's class, as the generator's training positives and as the third images of
    the close-loop check: every leg of a loop is then equally hard); the truth goes through the photo.
    """
    from PIL import Image

    from semcorr.hub_datasets.skimage_pairs import skimage_data_dir, warp_generator
    from semcorr.modeling import image_processor_for
    from semcorr.modeling.image_processing_semcorr import image_to_unit_tensor

    processor = image_processor_for(model.config)
    generator = warp_generator(strength, seed)
    parts = []
    for index, name in enumerate(photos):
        photo = image_to_unit_tensor(Image.open(skimage_data_dir() / name).convert("RGB"), processor.model_size)
        batch = generator(photo[None].repeat(per_photo, 1, 1, 1))
        source, grid_src_to_trg, valid_src = batch["source_pixel_values"], batch["grid_src_to_trg"], batch["valid_src"]
        if both_warped:
            first = generator(photo[None].repeat(per_photo, 1, 1, 1))  # source = another warp of the photo
            source = first["target_pixel_values"]
            grid_src_to_trg, valid_src = _compose_through_photo(first, batch)
        parts.append((processor.normalize(source), processor.normalize(batch["target_pixel_values"]),
                      torch.full((per_photo,), index), grid_src_to_trg, valid_src))
    return WarpedPairs(*(torch.cat(column) for column in zip(*parts)))


def _compose_through_photo(first: dict, second: dict):
    """Warp ``first``'s image -> the photo -> warp ``second``'s: ``(grid_src_to_trg (P, 2, H, W), valid_src (P, H, W))``."""
    from semcorr.modeling.ops.geometry import sample_grid_at

    in_photo = first["grid_trg_to_src"]  # (P, 2, H, W): where each pixel of the first warp comes from
    points = in_photo.flatten(2).transpose(1, 2)  # (P, H*W, 2)
    landed = sample_grid_at(second["grid_src_to_trg"], points).transpose(1, 2).view_as(in_photo)
    defined = sample_grid_at(second["valid_src"][:, None].float(), points)[..., 0].view_as(first["valid_trg"])
    return landed, first["valid_trg"].bool() & (defined > 0.99)


def _true_targets(pairs: WarpedPairs, rows, source_points: torch.Tensor):
    """Where source points ``(P, k, 2)`` (model pixels) truly land, and whether the warp defines it."""
    from semcorr.modeling.ops.geometry import grid_to_pixels, pixels_to_grid, sample_grid_at

    size = tuple(pairs.source.shape[-2:])
    points = pixels_to_grid(source_points, size)
    truth = grid_to_pixels(sample_grid_at(pairs.grid_src_to_trg[rows], points), size)
    defined = sample_grid_at(pairs.valid_src[rows, None].float(), points)[..., 0] > 0.99
    return truth, defined


def stage_labels(model, pairs: WarpedPairs, rows, stage: str, num_pairs: int) -> dict:
    """The pairs PMPS selects from ``stage``'s refined volume (``"image"``, ``"region"``, ``"pixel"``)."""
    source, target = pairs.source[rows], pairs.target[rows]
    with torch.no_grad():
        if stage == "region":
            return model(source, target, class_ids=torch.arange(len(source))).region_pairs
        encoded = model.encode(source), model.encode(target)
        volume = model.stage_volume(stage, *encoded)["refined"]
        return model.select_pairs(volume, source, target, encoded[0][2], encoded[1][2], num_pairs, refine=True)


def label_accuracy(model, pairs: WarpedPairs, stage: str = "pixel", num_pairs: int = 16, alphas=(0.05, 0.1),
                   batch_size: int = 4) -> dict:
    """PCK (threshold: alpha x the longer side of the model input) of the labels ``stage`` gives.

    Returns ``{"pck@<alpha>": float, "num_labels": int, "errors": (n,) pixel errors}``; labels whose
    source point the warp leaves undefined (outside the target) are not counted.
    """
    errors = []
    for start in range(0, len(pairs), batch_size):
        rows = torch.arange(start, min(len(pairs), start + batch_size))
        labels = stage_labels(model, pairs, rows, stage, num_pairs)
        truth, defined = _true_targets(pairs, rows, labels["source_points"])
        error = (labels["target_points"] - truth).norm(dim=-1)
        errors.append(error[labels["found"] & defined])
    errors = torch.cat(errors)
    side = max(pairs.source.shape[-2:])
    result = {f"pck@{alpha:g}": float((errors <= alpha * side).float().mean()) for alpha in alphas}
    return {**result, "num_labels": len(errors), "errors": errors}


def image_level_scores(model, pairs: WarpedPairs, batch_size: int = 8) -> dict:
    """Mean image-level AP of positive pairs and of negative pairs (sources against the next pair's
    targets when the two photos differ): ``{"positive", "negative", "margin"}``. Pairs are batched with
    the photos interleaved, so that the next pair is another photo's however many pairs each has."""
    positive, negative = [], []
    rank_in_photo = torch.zeros(len(pairs), dtype=torch.long)
    for photo in pairs.classes.unique():
        members = torch.nonzero(pairs.classes == photo)[:, 0]
        rank_in_photo[members] = torch.arange(len(members))
    interleaved = torch.argsort(rank_in_photo * (int(pairs.classes.max()) + 1) + pairs.classes, stable=True)
    for start in range(0, len(pairs), batch_size):
        rows = interleaved[start : start + batch_size]
        with torch.no_grad():
            source, target = model.encode(pairs.source[rows]), model.encode(pairs.target[rows])
            _, _, pos, neg = model.image_level_loss(source, target, pairs.classes[rows])
        differ = pairs.classes[rows] != pairs.classes[rows].roll(1)
        positive.append(pos)
        negative.append(neg[differ])
    positive, negative = float(torch.cat(positive).mean()), float(torch.cat(negative).mean())
    return {"positive": positive, "negative": negative, "margin": positive - negative}


def spearman(a, b) -> float:
    """Spearman rank correlation of two 1-D sequences (average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(np.asarray(a), np.asarray(b)).statistic)


def consistency_ranking(model, pairs: WarpedPairs, num_thirds: int = 3, num_pairs: int = 16) -> dict:
    """How well the close-loop score ranks labels: Spearman between each label's score (the mean
    round-trip offset through ``num_thirds`` other warps of its photo) and its true error, and between
    each pair's score (the mean over its labels, what SC-ImageNet's selection keeps the top 30 % of
    pairs by) and its labels' mean error. The labels are those of the model's last enabled stage
    (what ``pseudo_label`` gives).

    Returns ``{"spearman": per label, "pair_spearman": per pair, "num_labels", "num_pairs"}``; positive
    means: inconsistent labels (pairs) are the wrong ones.
    """
    from semcorr.modeling.cascaded_mil.consistency import consistency_scores

    scores, errors, pair_scores, pair_errors = [], [], [], []
    for photo in pairs.classes.unique():
        rows = torch.nonzero(pairs.classes == photo)[:, 0]
        labels = stage_labels(model, pairs, rows, model.config.enabled_stages[-1], num_pairs)
        truth, defined = _true_targets(pairs, rows, labels["source_points"])
        thirds = torch.stack([pairs.target[rows.roll(-shift)] for shift in range(1, num_thirds + 1)], dim=1)
        with torch.no_grad():
            round_trip = consistency_scores(model.match, pairs.source[rows], pairs.target[rows], thirds,
                                            points=labels["source_points"])
        keep = labels["found"] & defined
        error = (labels["target_points"] - truth).norm(dim=-1)
        scores.append(round_trip["per_point"][keep])
        errors.append(error[keep])
        counted = keep.any(dim=1)
        weights = keep.to(error.dtype) / keep.sum(dim=1, keepdim=True).clamp_min(1)
        pair_scores.append((round_trip["per_point"] * weights).sum(dim=1)[counted])
        pair_errors.append((error * weights).sum(dim=1)[counted])
    scores, errors, pair_scores, pair_errors = (torch.cat(part) for part in (scores, errors, pair_scores, pair_errors))
    return {"spearman": spearman(scores, errors), "pair_spearman": spearman(pair_scores, pair_errors),
            "num_labels": len(scores), "num_pairs": len(pair_scores)}
