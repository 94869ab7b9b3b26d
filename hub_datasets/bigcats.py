"""Big cats: a small cross-instance validation set (faces of different cats, hand-annotated keypoints).

Same-scene pairs (a stereo pair, a warp of one photo) cannot show that a matcher works across
*instances*; this set can. Four photos of different animals of the cat family, each shipped by an
installed package, so nothing is downloaded:

=========  ==============================================  =====================================
key        photo                                           keypoints
=========  ==============================================  =====================================
cheetah1   gradio ``media_assets/images/cheetah1.jpg``     eye_l, eye_r, nose, mouth, ear_l, ear_r
cheetah2   gradio ``test_data/cheetah2.jpg``               eye_l, eye_r, nose, mouth, ear_l, ear_r
lion       gradio ``media_assets/images/lion.jpg``         eye_l, eye_r, nose, mouth
chelsea    scikit-image ``skimage.data.chelsea()``         eye_l, eye_r, nose, mouth
=========  ==============================================  =====================================

The annotation (``data/bigcats.json``) gives each keypoint as the ``[x, y]`` index of the pixel it
marks; ``eye_l`` is the eye on the image's left side. :func:`load_bigcats` converts them into the
package convention (the centre of pixel ``i`` is ``i + 0.5``).

Protocol: every ordered pair of distinct images (12), every keypoint name the two share (52
transfers in all); a transfer is correct when it lands within ``0.1 x`` the longer side of the
*target* image (PCK@0.1, threshold ``"image"``), and the score is the fraction of the 52 transfers
that are correct (:func:`bigcats_pck`).

Three of the photos come with gradio: without it :func:`load_bigcats` raises
:class:`BigCatsUnavailableError`, which says to ``pip install gradio`` (or ``pip install "semcorr[demo]"``).

``python -m semcorr.hub_datasets.bigcats --output-dir DIR`` writes the 12 pairs as a ``save_to_disk``
folder in the benchmark pair schema, with the whole image as each box, so that ::

    semcorr evaluate --dataset DIR --average point --alphas 0.1

scores the protocol above (the default ``bbox`` threshold is then the image's longer side).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from itertools import permutations
from pathlib import Path

import numpy as np
from PIL import Image

from .skimage_pairs import KeypointPair

#: The annotation file shipped with the package.
BIGCATS_JSON = Path(__file__).parent / "data" / "bigcats.json"
#: Keypoint names, in the order every pair lists them.
KEYPOINT_NAMES = ("eye_l", "eye_r", "nose", "mouth", "ear_l", "ear_r")
#: PCK of the protocol: alpha x the longer side of the target image.
ALPHA = 0.1
INSTALL_HINT = 'pip install gradio (or pip install "semcorr[demo]")'


class BigCatsUnavailableError(ImportError):
    """A photo of the big-cat set is not installed here (gradio missing, or a version without the file)."""


@dataclass
class AnnotatedImage:
    """One photo and its named keypoints, ``{name: (x, y)}`` in pixels (package convention)."""

    name: str
    image: Image.Image
    keypoints: dict[str, tuple[float, float]]
    source: str


@dataclass
class NamedKeypointPair(KeypointPair):
    """A :class:`~semcorr.hub_datasets.skimage_pairs.KeypointPair` whose rows carry keypoint names."""

    keypoint_names: tuple[str, ...] = field(default_factory=tuple)


def annotation(path: str | Path = BIGCATS_JSON) -> dict:
    """The raw annotation: ``{key: {"src": "package:path", "kps": {name: [x, y]}}}``."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)["images"]


def _read_photo(source: str) -> Image.Image:
    """The photo named ``package:relative path`` (``skimage:NAME`` is ``skimage.data.NAME()``)."""
    from semcorr.modeling.image_io import load_image

    package, _, relative = source.partition(":")
    if package == "skimage":
        import skimage.data

        return load_image(getattr(skimage.data, relative)())
    spec = importlib.util.find_spec(package)  # locates the package without importing it (gradio is slow to import)
    if spec is None or not spec.submodule_search_locations:
        raise BigCatsUnavailableError(
            f"the big-cat validation set needs the {package} package, which ships the photo {relative!r}: {INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise BigCatsUnavailableError(
            f"the installed {package} does not ship {relative!r} (looked in {path.parent}); the big-cat validation "
            f"set was annotated on gradio 5-6: {INSTALL_HINT}"
        )
    return load_image(path)


def load_bigcats(path: str | Path = BIGCATS_JSON) -> dict[str, AnnotatedImage]:
    """The four photos and their keypoints, ``{key: AnnotatedImage}`` in the annotation's order.

    Raises:
        BigCatsUnavailableError: gradio (which ships three of the photos) is not installed; the
            message says ``pip install gradio``.
    """
    images = {}
    for key, entry in annotation(path).items():
        keypoints = {name: (float(x) + 0.5, float(y) + 0.5) for name, (x, y) in entry["kps"].items()}
        images[key] = AnnotatedImage(key, _read_photo(entry["src"]), keypoints, entry["src"])
    return images


def bigcat_pairs(images: dict[str, AnnotatedImage] | None = None) -> list[NamedKeypointPair]:
    """Every ordered pair of distinct photos with the keypoints both have (12 pairs, 52 transfers)."""
    images = load_bigcats() if images is None else images
    pairs = []
    for source, target in permutations(images.values(), 2):
        names = tuple(n for n in KEYPOINT_NAMES if n in source.keypoints and n in target.keypoints)
        pairs.append(NamedKeypointPair(
            f"{source.name} -> {target.name}", source.image, target.image,
            np.array([source.keypoints[n] for n in names], dtype=np.float32),
            np.array([target.keypoints[n] for n in names], dtype=np.float32),
            keypoint_names=names,
        ))
    return pairs


def transfer_correct(pair: KeypointPair, predicted, alpha: float = ALPHA) -> np.ndarray:
    """Boolean per keypoint: ``predicted`` (N, 2) lies within ``alpha x`` the target's longer side."""
    error = np.linalg.norm(np.asarray(predicted, dtype=np.float64) - pair.target_keypoints, axis=1)
    return error <= alpha * max(pair.target_image.size)


def bigcats_pck(pairs: list[KeypointPair], predictions, alpha: float = ALPHA) -> dict:
    """The protocol's score of ``predictions`` (one (N, 2) array per pair, target pixels).

    Returns:
        ``{"pck": fraction of all transfers correct, "correct": int, "transfers": int,
        "per_pair": {pair name: (correct, transfers)}}``.
    """
    if len(pairs) != len(predictions):
        raise ValueError(f"{len(pairs)} pairs but {len(predictions)} predictions")
    per_pair = {}
    for pair, predicted in zip(pairs, predictions):
        correct = transfer_correct(pair, predicted, alpha)
        per_pair[pair.name] = (int(correct.sum()), len(correct))
    correct, transfers = (sum(v[i] for v in per_pair.values()) for i in (0, 1))
    return {"pck": correct / transfers, "correct": correct, "transfers": transfers, "per_pair": per_pair}


def bigcats_dataset(images: dict[str, AnnotatedImage] | None = None):
    """The 12 pairs as a ``datasets.Dataset`` in the benchmark pair schema (category ``"cat-face"``).

    Each box is the whole image, so the metric's default ``bbox`` threshold is the protocol's
    (``alpha x`` the image's longer side); score per point (``average="point"``) as the protocol does.
    """
    from .skimage_pairs import keypoint_pairs_dataset

    return keypoint_pairs_dataset(bigcat_pairs(images), category="cat-face", box="image")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m semcorr.hub_datasets.bigcats",
        description="Write the big-cat validation pairs as a save_to_disk folder, for semcorr evaluate --dataset.",
    )
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args(argv)
    from semcorr.utils import atomic_directory

    try:
        dataset = bigcats_dataset()
    except BigCatsUnavailableError as error:
        print(f"bigcats: error: {error}", file=sys.stderr)
        return 2
    with atomic_directory(Path(args.output_dir)) as staging:
        dataset.save_to_disk(str(staging))
    print(f"wrote {args.output_dir} ({len(dataset)} pairs); score it with: "
          f"semcorr evaluate --dataset {args.output_dir} --average point --alphas 0.1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
