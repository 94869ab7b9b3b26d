"""How good are a pseudo-label generator's labels? Measured on warps with known correspondence.

No labelled cross-instance data exists offline, so the checks of the cascaded MIL generator use
image pairs whose correspondence is known by construction: a photo and a random warp of it (the
"class" of a photo is the set of its warps). The warp is used only to measure, never to train.

* :func:`warped_pairs` -- held-out pairs (photo, warp) with the dense ground truth.
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


def warped_pairs(model, photos, per_photo: int = 4, strength: float = 0.35, seed: int = 123) -> WarpedPairs:
    """``per_photo`` pairs (the photo, a random warp of it) of every photo of scikit-image's data folder
    in ``photos``, at the model's input size (warps: :func:`~semcorr.hub_datasets.skimage_pairs.warp_generator`)."""
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
        parts.append((processor.normalize(batch["source_pixel_values"]), processor.normalize(batch["target_pixel_values"]),
                      torch.full((per_photo,), index), batch["grid_src_to_trg"], batch["valid_src"]))
    return WarpedPairs(*(torch.cat(column) for column in zip(*parts)))


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
    targets when the two photos differ): ``{"positive", "negative", "margin"}``."""
    positive, negative = [], []
    for start in range(0, len(pairs), batch_size):
        rows = torch.arange(start, min(len(pairs), start + batch_size))
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
    round-trip offset through ``num_thirds`` other warps of its photo) and its true error. The labels
    are those of the model's last enabled stage (what ``pseudo_label`` gives).

    Returns ``{"spearman": float, "num_labels": int}``; positive means: inconsistent labels are the wrong ones.
    """
    from semcorr.modeling.cascaded_mil.consistency import consistency_scores

    scores, errors = [], []
    for photo in pairs.classes.unique():
        rows = torch.nonzero(pairs.classes == photo)[:, 0]
        labels = stage_labels(model, pairs, rows, model.config.enabled_stages[-1], num_pairs)
        truth, defined = _true_targets(pairs, rows, labels["source_points"])
        thirds = torch.stack([pairs.target[rows.roll(-shift)] for shift in range(1, num_thirds + 1)], dim=1)
        with torch.no_grad():
            round_trip = consistency_scores(model.match, pairs.source[rows], pairs.target[rows], thirds,
                                            points=labels["source_points"])
        keep = labels["found"] & defined
        scores.append(round_trip["per_point"][keep])
        errors.append((labels["target_points"] - truth).norm(dim=-1)[keep])
    scores, errors = torch.cat(scores), torch.cat(errors)
    return {"spearman": spearman(scores, errors), "num_labels": len(scores)}
