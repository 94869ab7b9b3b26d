"""``semcorr demo``: the embedded default on real image pairs with known correspondence."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ALPHAS = (0.05, 0.1)


def _pck(predicted: np.ndarray, truth: np.ndarray, image_size: tuple[int, int]) -> dict[str, float]:
    from semcorr.spaces.pck import compute_pck

    result = compute_pck([predicted], [truth], alphas=list(ALPHAS), threshold="image", average="point", image_sizes=[image_size])
    return {alpha: result[f"pck@{alpha:g}"] for alpha in ALPHAS}


def save_image_atomically(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write ``image`` next to ``path`` under a temporary name, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix or ".png"
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=suffix)
    os.close(fd)
    try:
        image.save(tmp, format=Image.registered_extensions().get(suffix.lower(), "PNG"))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a picture should get ordinary permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def run_demo(out: str | os.PathLike = "demo.png", num_points: int = 500, seed: int = 0, model=None, print_fn=print) -> dict:
    """Match the scikit-image stereo pair and a random affine warp of ``chelsea``.

    Prints PCK@0.05 and PCK@0.1 (threshold: alpha x the longest side of the target image) on
    ``num_points`` ground-truth correspondences per pair and writes a picture of the matches,
    lines green where correct at alpha = 0.05 and red where not.

    Returns:
        ``{pair name: {alpha: pck}}``.
    """
    from semcorr.hub_datasets.skimage_pairs import affine_pair, stereo_pair
    from semcorr.pipelines import default_pipeline, draw_matches
    from transformers import pipeline

    pipe = default_pipeline() if model is None else pipeline("semantic-correspondence", model=model)
    pairs = [stereo_pair(num_points, seed), affine_pair(num_points=num_points, seed=seed)]
    results, panels = {}, []
    print_fn(f"{'pair':<24}{'points':>8}{'PCK@0.05':>10}{'PCK@0.1':>10}")
    for pair in pairs:
        output = pipe({"source_image": pair.source_image, "target_image": pair.target_image,
                       "source_keypoints": pair.source_keypoints})
        predicted = np.asarray(output["target_keypoints"], dtype=np.float64)
        size = (pair.target_image.height, pair.target_image.width)
        scores = _pck(predicted, pair.target_keypoints, size)
        results[pair.name] = scores
        print_fn(f"{pair.name:<24}{len(predicted):>8}{scores[0.05]:>10.3f}{scores[0.1]:>10.3f}")
        shown = slice(0, 80)
        error = np.linalg.norm(predicted - pair.target_keypoints, axis=1)
        colors = [(26, 152, 80) if e <= 0.05 * max(size) else (215, 48, 39) for e in error[shown]]
        subset = {"source_keypoints": pair.source_keypoints[shown], "target_keypoints": predicted[shown],
                  "scores": output["scores"][shown]}
        panels.append(draw_matches(pair.source_image, pair.target_image, subset, max_height=360, colors=colors))
    width = max(panel.width for panel in panels)
    canvas = Image.new("RGB", (width, sum(panel.height for panel in panels)), "white")
    top = 0
    for panel in panels:
        canvas.paste(panel, (0, top))
        top += panel.height
    path = save_image_atomically(canvas, out)
    print_fn(f"wrote {path}")
    return results
