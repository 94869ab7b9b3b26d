"""What the match scores of a model say: true matches against matches between unrelated images.

Run from the repository root (offline; about a minute on 2 CPU cores)::

    python benchmarks/bench_scores.py                   # the embedded default
    python benchmarks/bench_scores.py --model runs/student/final

Pairs with known correspondence (their ground-truth keypoints transferred through the pipeline; a
transfer is correct within 0.05 of the target's longer side, 0.1 for the big cats): the Middlebury
stereo pair (500 points), a seeded affine warp of *chelsea* (500 points), the 12 big-cat pairs (52
points; needs gradio). Unrelated pairs, whose every match is wrong: uniform noise and *chelsea*
both ways, a flat grey image and itself, *coffee* and *chelsea*; their ``top_k=30`` mutual matches.
The last column is the share of each row's matches that the threshold keeping 90 % of the correct
stereo transfers (their 10th percentile) keeps.
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image


def _transfer(pipe, pair):
    out = pipe({"source_image": pair.source_image, "target_image": pair.target_image,
                "source_keypoints": pair.source_keypoints.tolist()})
    error = np.linalg.norm(np.array(out["target_keypoints"]) - pair.target_keypoints, axis=1)
    return error / max(pair.target_image.size), np.array(out["scores"])


def _row(name, scores, threshold=None):
    if len(scores) == 0:
        return f"| {name} | 0 | | | | |"
    p10, p50, top = np.percentile(scores, 10), np.median(scores), np.max(scores)
    kept = "" if threshold is None else f"{np.mean(scores >= threshold):.2f}"
    return f"| {name} | {len(scores)} | {p10:.3f} | {p50:.3f} | {top:.3f} | {kept} |"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model folder or Hub id (default: the embedded default)")
    args = parser.parse_args(argv)

    import semcorr.pipelines  # noqa: F401  (registers the task)
    from transformers import pipeline

    from semcorr.hub_datasets.skimage_pairs import affine_pair, skimage_data_dir, stereo_pair
    from semcorr.modeling import load_matcher

    model, processor, model_id = load_matcher(args.model)
    pipe = pipeline("semantic-correspondence", model=model, image_processor=processor)
    root = skimage_data_dir()
    chelsea = Image.open(root / "chelsea.png").convert("RGB")
    rows = []
    error, scores = _transfer(pipe, stereo_pair(500, seed=0))
    threshold = float(np.percentile(scores[error <= 0.05], 10))
    rows.append(_row(f"stereo, correct transfers ({np.mean(error <= 0.05):.3f} of 500)", scores[error <= 0.05], threshold))
    error, scores = _transfer(pipe, affine_pair(chelsea, 500, seed=0))
    rows.append(_row(f"warp of chelsea, correct transfers ({np.mean(error <= 0.05):.3f} of 500)", scores[error <= 0.05],
                     threshold))
    try:
        from semcorr.hub_datasets.bigcats import bigcat_pairs

        transfers = [_transfer(pipe, pair) for pair in bigcat_pairs()]
        error, scores = np.concatenate([e for e, _ in transfers]), np.concatenate([s for _, s in transfers])
        rows.append(_row("big cats, correct transfers (PCK@0.1)", scores[error <= 0.1], threshold))
        rows.append(_row("big cats, wrong transfers", scores[error > 0.1], threshold))
    except ImportError as error:  # gradio missing: no big-cat photos
        rows.append(f"| big cats: {error} | | | | | |")
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (300, 450, 3), dtype=np.uint8))
    grey = Image.fromarray(np.full((300, 300, 3), 128, np.uint8))
    coffee = Image.open(root / "coffee.png").convert("RGB")
    for name, (source, target) in {"noise -> chelsea": (noise, chelsea), "chelsea -> noise": (chelsea, noise),
                                   "flat grey -> itself": (grey, grey), "coffee -> chelsea": (coffee, chelsea)}.items():
        top = pipe({"source_image": source, "target_image": target}, top_k=30)
        rows.append(_row(f"unrelated: {name}, top-30 mutual matches", np.array(top["scores"]), threshold))
    print(f"model: {model_id}; threshold keeping 90 % of the correct stereo transfers: {threshold:.3f}\n")
    print("| matches | n | score p10 | median | max | kept by the threshold |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
