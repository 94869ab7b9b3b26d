"""A picture of the cascaded MIL generator at work: what each stage hands on, on one pair.

    python -m semcorr.pipelines.cascade_figure --model runs/cascaded-mil-cpu-tiny/final --out cascade.png

draws, for a held-out photo and a random warp of it (the warp gives the true correspondence), the
image stage's suspects, the region stage's pairs and the pixel stage's pseudo labels, one panel per
stage, each match green when it lands within 0.05 x the longer side of the truth and red when not.
:func:`draw_cascade` draws any pair, with or without a truth.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import numpy as np
from PIL import Image

from .drawing import draw_matches, save_image, stack_panels

STAGE_NAMES = {"image": "1. image stage: suspects (PMPS on the image-level volume)",
               "region": "2. region stage: each suspect's match refined in its re-encoded window, after NMS",
               "pixel": "3. pixel stage: the pseudo labels (PMPS on the pixel-level volume)"}
CORRECT, WRONG = (26, 152, 80), (215, 48, 39)


def draw_cascade(model, source_image: Image.Image, target_image: Image.Image,
                 true_targets: Callable[[np.ndarray], np.ndarray] | None = None, alpha: float = 0.05,
                 panel_height: int = 360) -> tuple[Image.Image, dict]:
    """Stack one panel per enabled stage of ``model`` (a ``CascadedMILModel``) on one pair.

    Args:
        true_targets: maps source points ``(N, 2)`` to their true target points (original pixels); then
            matches are green within ``alpha`` x the target's longer side and red beyond, else coloured
            by score.

    Returns:
        ``(picture, {stage: {"pairs": n, "pck": fraction or None}})``.
    """
    from semcorr.modeling import image_processor_for

    processor = image_processor_for(model.config)
    processed = processor.preprocess_pairs([source_image], [target_image])
    stages = model.cascade(processed["source_pixel_values"], processed["target_pixel_values"])
    source_size, target_size = (source_image.height, source_image.width), (target_image.height, target_image.width)
    panels, summary = [], {}
    for stage, pairs in stages.items():
        found = pairs["found"][0].bool()
        source = processor.keypoints_to_original(pairs["source_points"][0][found], source_size).numpy()
        target = processor.keypoints_to_original(pairs["target_points"][0][found], target_size).numpy()
        result = {"source_keypoints": source, "target_keypoints": target,
                  "scores": pairs["scores"][0][found].clamp(0, 1).numpy()}
        colors, pck = None, None
        if true_targets is not None and len(source):
            correct = np.linalg.norm(target - true_targets(source), axis=1) <= alpha * max(target_image.size)
            colors, pck = [CORRECT if ok else WRONG for ok in correct], float(correct.mean())
        summary[stage] = {"pairs": len(source), "pck": pck}
        text = STAGE_NAMES[stage] + f": {len(source)} pairs"
        if pck is not None:
            text += f", {pck:.0%} within {alpha} x the longer side of the truth (green)"
        # drawn at panel_height even when the images are smaller (draw_matches never enlarges them)
        scale = max(1.0, panel_height / max(source_image.height, target_image.height))
        shown = {**result, "source_keypoints": source * scale, "target_keypoints": target * scale}
        panels.append((text, draw_matches(_enlarged(source_image, scale), _enlarged(target_image, scale), shown,
                                          max_height=panel_height, colors=colors)))
    picture, _ = stack_panels(panels)
    return picture, summary


def _enlarged(image: Image.Image, scale: float) -> Image.Image:
    if scale == 1.0:
        return image
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)


def warped_example(size, photo: str = "chelsea.png", strength: float = 0.35, seed: int = 123):
    """A held-out photo at ``size = (height, width)``, a random warp of it, and the truth (original pixels)."""
    from semcorr.hub_datasets.skimage_pairs import skimage_data_dir, warp_generator
    from semcorr.modeling.image_processing_semcorr import image_to_unit_tensor
    from semcorr.modeling.ops.geometry import grid_to_pixels, pixels_to_grid, sample_grid_at

    photo_pixels = image_to_unit_tensor(Image.open(skimage_data_dir() / photo).convert("RGB"), size)
    batch = warp_generator(strength, seed)(photo_pixels[None])

    def to_image(pixels):
        return Image.fromarray((pixels.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy())

    def true_targets(points: np.ndarray) -> np.ndarray:
        import torch

        grid = pixels_to_grid(torch.as_tensor(points, dtype=torch.float32)[None], size)
        return grid_to_pixels(sample_grid_at(batch["grid_src_to_trg"], grid), size)[0].numpy()

    return to_image(batch["source_pixel_values"][0]), to_image(batch["target_pixel_values"][0]), true_targets


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Draw what each stage of a cascaded MIL generator hands on, "
                                                 "on a held-out photo and a random warp of it")
    parser.add_argument("--model", required=True, help="a saved CascadedMILModel (folder or Hub id)")
    parser.add_argument("--out", default="cascade.png")
    parser.add_argument("--photo", default="chelsea.png", help="a photo of scikit-image's data folder")
    parser.add_argument("--seed", type=int, default=123, help="the warp's seed")
    args = parser.parse_args(argv)
    try:
        from semcorr.modeling import CascadedMILModel, load_matcher

        model, _, _ = load_matcher(args.model, device="cpu")
        if not isinstance(model, CascadedMILModel):
            raise ValueError(f"--model {args.model} is a {type(model).__name__}, not a cascaded MIL generator")
        source, target, truth = warped_example(tuple(model.config.image_size), args.photo, seed=args.seed)
        picture, summary = draw_cascade(model, source, target, truth)
    except (ValueError, OSError) as error:
        print(f"cascade_figure: {error}", file=sys.stderr)
        return 2
    for stage, row in summary.items():
        print(f"{stage:>6} stage: {row['pairs']:3d} pairs, PCK@0.05 {row['pck']:.3f}")
    print(f"wrote {save_image(picture, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
