"""``semcorr demo``: the embedded default on real image pairs with known correspondence.

Three pairs, all shipped by installed packages (nothing is downloaded):

* **stereo**: scikit-image's Middlebury *motorcycle* pair, ground truth from its disparity map;
* **affine warp**: scikit-image's *chelsea* and a seeded random affine warp of it;
* **cross-instance**: two *different animals* of the big-cat validation set
  (:mod:`semcorr.hub_datasets.bigcats`), their annotated keypoints (eyes, nose, mouth, ears)
  transferred from one to the other -- what semantic correspondence is for. Three of its photos
  come with gradio; without it the row says how to get them.

The picture stacks one panel per pair under a caption: the dense pairs show a spread-out subset of
their points, the cross-instance pair every keypoint with its name, each line green where the
transfer is correct and red where it is not (the convention of the papers' qualitative figures).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from .drawing import CAPTION_HEIGHT, font, panel_sizes, save_image, stack_panels

ALPHAS = (0.05, 0.1)
#: The cross-instance pair drawn and scored: (source, target) keys of the big-cat set.
CROSS_INSTANCE_PAIR = ("chelsea", "lion")
#: Alpha at which a drawn point counts as correct: dense same-scene pairs / the cross-instance pair.
DENSE_ALPHA, CROSS_ALPHA = 0.05, 0.1
#: Points drawn per dense pair (farthest-point subset of the scored ones).
DENSE_SHOWN = 40
#: Height of the images on the picture, in pixels: the dense pairs, and the cross-instance pair (whose faces are small).
PANEL_HEIGHT, CROSS_PANEL_HEIGHT = 360, 480
GREEN, RED = (26, 152, 80), (215, 48, 39)
GRADIO_HINT = 'needs gradio, which ships the photos: pip install "semcorr[demo]" (or pip install gradio)'


@dataclass
class PairResult:
    """What the demo measured on one pair, and where it drew it.

    Attributes:
        name: the row's name.
        pck: ``{alpha: PCK}`` (threshold: alpha x the target image's longer side); None when skipped.
        points: number of scored points.
        skipped: why the pair was not run (``None`` when it was).
        source_keypoints: ``(N, 2)`` source points, source pixels.
        predicted: ``(N, 2)`` transferred points, target pixels; ``truth``: the ground truth.
        correct: per point, within ``alpha_drawn`` x the target's longer side.
        shown: indices of the drawn points; ``keypoint_names``: names of the points (cross-instance).
        source_xy, target_xy: where each drawn point's dot is on the picture, ``(len(shown), 2)``.
    """

    name: str
    pck: dict | None = None
    points: int = 0
    skipped: str | None = None
    source_keypoints: np.ndarray | None = None
    predicted: np.ndarray | None = None
    truth: np.ndarray | None = None
    correct: np.ndarray | None = None
    alpha_drawn: float = DENSE_ALPHA
    shown: np.ndarray | None = None
    keypoint_names: tuple = ()
    source_xy: np.ndarray | None = field(default=None, repr=False)
    target_xy: np.ndarray | None = field(default=None, repr=False)


def _pck(predicted: np.ndarray, truth: np.ndarray, image_size: tuple[int, int]) -> dict[float, float]:
    from semcorr.spaces.pck import compute_pck

    result = compute_pck([predicted], [truth], alphas=list(ALPHAS), threshold="image", average="point", image_sizes=[image_size])
    return {alpha: result[f"pck@{alpha:g}"] for alpha in ALPHAS}


def spread_subset(points: np.ndarray, count: int) -> np.ndarray:
    """Indices of ``count`` well spread ``points`` (farthest-point sampling from the most central one)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if count >= len(points):
        return np.arange(len(points))
    chosen = [int(np.argmin(np.linalg.norm(points - points.mean(axis=0), axis=1)))]
    distance = np.linalg.norm(points - points[chosen[0]], axis=1)
    while len(chosen) < count:
        chosen.append(int(np.argmax(distance)))
        distance = np.minimum(distance, np.linalg.norm(points - points[chosen[-1]], axis=1))
    return np.array(chosen)


def _draw_pair(source: Image.Image, target: Image.Image, result: PairResult, panel_height: int) -> Image.Image:
    """One panel: the images side by side, ``panel_height`` high, a line per drawn point.

    Records in ``result.source_xy`` / ``target_xy`` where each dot is on the panel.
    """
    (left_w, height), (right_w, _) = panel_sizes(source.size, target.size, panel_height)
    scale_source = np.array([left_w / source.width, height / source.height])
    scale_target = np.array([right_w / target.width, height / target.height])
    if height < panel_height:  # small images are enlarged, so that every panel reads alike
        factor = panel_height / height
        left_w, right_w, height = round(left_w * factor), round(right_w * factor), panel_height
        scale_source, scale_target = scale_source * factor, scale_target * factor
    canvas = Image.new("RGB", (left_w + right_w, height), "white")
    canvas.paste(source.resize((left_w, height), Image.BILINEAR, reducing_gap=3.0), (0, 0))
    canvas.paste(target.resize((right_w, height), Image.BILINEAR, reducing_gap=3.0), (left_w, 0))
    draw = ImageDraw.Draw(canvas)

    shown = result.shown
    source_xy = result.source_keypoints[shown] * scale_source
    target_xy = result.predicted[shown] * scale_target + [left_w, 0]
    colors = [GREEN if ok else RED for ok in result.correct[shown]]
    named = bool(result.keypoint_names)
    width, radius = (3, 6) if named else (2, 4)
    if named:  # the annotated target points: a white cross; around a missed one, the ring it had to land in
        truth_xy = result.truth[shown] * scale_target + [left_w, 0]
        ring = result.alpha_drawn * max(target.size) * scale_target[1]
        for (x, y), ok in zip(truth_xy, result.correct[shown]):
            if not ok:
                draw.ellipse([x - ring, y - ring, x + ring, y + ring], outline=(255, 255, 255), width=2)
            draw.line([(x - 6, y), (x + 6, y)], fill=(255, 255, 255), width=2)
            draw.line([(x, y - 6), (x, y + 6)], fill=(255, 255, 255), width=2)
    order = np.argsort(result.correct[shown], kind="stable")  # wrong ones first: correct lines on top
    for index in order:
        draw.line([tuple(source_xy[index]), tuple(target_xy[index])], fill=colors[index], width=width)
    if named:
        label_font = font(15)
        for index in order:
            name = result.keypoint_names[shown[index]]
            for x, y in (source_xy[index], target_xy[index]):
                draw.text((x + radius + 3, y - radius - 3), name, fill=(255, 255, 255), font=label_font, anchor="ld",
                          stroke_width=2, stroke_fill=(0, 0, 0))
    for index in order:  # dots last, so each keeps its colour under any line or label
        for x, y in (source_xy[index], target_xy[index]):
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colors[index], outline="white")
    result.source_xy, result.target_xy = source_xy, target_xy
    return canvas


def _cross_instance_pair():
    """The cross-instance :class:`~semcorr.hub_datasets.bigcats.NamedKeypointPair` (raises without gradio)."""
    from semcorr.hub_datasets.bigcats import bigcat_pairs, load_bigcats

    images = load_bigcats()
    wanted = f"{CROSS_INSTANCE_PAIR[0]} -> {CROSS_INSTANCE_PAIR[1]}"
    return next(pair for pair in bigcat_pairs(images) if pair.name == wanted)


def run_demo(out: str | os.PathLike = "demo.png", num_points: int = 500, seed: int = 0, model=None, print_fn=print,
             num_shown: int = DENSE_SHOWN) -> dict[str, PairResult]:
    """Match the stereo pair, an affine warp of ``chelsea`` and two different animals; print PCK; draw them.

    Prints one row per pair: PCK@0.05 and PCK@0.1 (threshold: alpha x the longest side of the target
    image) on ``num_points`` ground-truth correspondences of each dense pair and on the annotated
    keypoints of the cross-instance pair. Writes ``out``: ``num_shown`` well spread points per dense
    pair (green when correct at alpha = 0.05, red when not) and every keypoint of the cross-instance
    pair with its name (green when correct at alpha = 0.1, red when not; a white cross marks each
    annotated point, and a white ring of radius 0.1 x the longer side around a missed one shows where
    the transfer had to land). Without gradio the cross-instance row says how to get its photos.

    Returns:
        ``{row name: PairResult}``; ``result.pck`` is ``{alpha: pck}``.
    """
    from transformers import pipeline

    from semcorr.hub_datasets.bigcats import BigCatsUnavailableError
    from semcorr.hub_datasets.skimage_pairs import affine_pair, stereo_pair
    from semcorr.modeling import load_matcher
    from semcorr.pipelines import TASK

    matcher, processor, _ = load_matcher(model)  # None: the embedded default
    pipe = pipeline(TASK, model=matcher, image_processor=processor)
    pairs = [stereo_pair(num_points, seed), affine_pair(num_points=num_points, seed=seed)]
    try:
        cross = _cross_instance_pair()
        cross.name = f"cats: {CROSS_INSTANCE_PAIR[0]} -> {CROSS_INSTANCE_PAIR[1]}"
        pairs.append(cross)
    except BigCatsUnavailableError:
        cross = None

    results, panels = {}, []
    print_fn(f"{'pair':<24}{'points':>8}{'PCK@0.05':>10}{'PCK@0.1':>10}")
    for pair in pairs:
        output = pipe({"source_image": pair.source_image, "target_image": pair.target_image,
                       "source_keypoints": pair.source_keypoints})
        predicted = np.asarray(output["target_keypoints"], dtype=np.float64)
        truth = np.asarray(pair.target_keypoints, dtype=np.float64)
        size = (pair.target_image.height, pair.target_image.width)
        scores = _pck(predicted, truth, size)
        print_fn(f"{pair.name:<24}{len(predicted):>8}{scores[0.05]:>10.3f}{scores[0.1]:>10.3f}")
        names = tuple(getattr(pair, "keypoint_names", ()))
        alpha = CROSS_ALPHA if names else DENSE_ALPHA
        result = PairResult(
            pair.name, scores, len(predicted), source_keypoints=np.asarray(pair.source_keypoints, dtype=np.float64),
            predicted=predicted, truth=truth,
            correct=np.linalg.norm(predicted - truth, axis=1) <= alpha * max(size), alpha_drawn=alpha,
            shown=np.arange(len(predicted)) if names else spread_subset(pair.source_keypoints, num_shown),
            keypoint_names=names,
        )
        results[pair.name] = result
        panel = _draw_pair(pair.source_image, pair.target_image, result, CROSS_PANEL_HEIGHT if names else PANEL_HEIGHT)
        if names:
            text = (f"Different animals ({CROSS_INSTANCE_PAIR[0]} -> {CROSS_INSTANCE_PAIR[1]}): PCK@0.1 {scores[0.1]:.2f} "
                    f"({int(result.correct.sum())}/{len(predicted)}). Green: within 0.1 x longer side of the annotation "
                    "(+); red: not (ring: the limit)")
        else:
            text = (f"{pair.name.capitalize()}, same scene: {len(result.shown)} of {len(predicted)} points, "
                    f"PCK@0.05 {scores[0.05]:.3f}. Green: within 0.05 x longer side of the truth; red: not")
        panels.append((result, text, panel))
    if cross is None:
        name = "cats (cross-instance)"
        print_fn(f"{name:<24}{'-':>8}  {GRADIO_HINT}")
        results[name] = PairResult(name, skipped=GRADIO_HINT)

    canvas, tops = stack_panels([(text, panel) for _, text, panel in panels])
    for (result, _, _), top in zip(panels, tops):
        result.source_xy, result.target_xy = result.source_xy + [0, top], result.target_xy + [0, top]
    path = save_image(canvas, out)
    print_fn(f"wrote {path}")
    return results
