"""Which ImageNet images SC-ImageNet keeps: the class drop list and the single-instance detector filter.

Huang et al. (*Weakly Supervised Learning of Semantic Correspondence through Cascaded Online
Correspondence Refinement*, ICCV 2023) built SC-ImageNet from the ImageNet-1k train set by removing
321 classes unsuitable for semantic correspondence and keeping the images in which a COCO-trained
detector finds exactly one object above 0.9. They did not publish their class list. semcorr ships
its own (:data:`DEFAULT_DROP_LIST`), derived by a written rule from the WordNet 3.0 hierarchy
(:data:`DROP_RULE`): an ImageNet class ``n<offset>`` is WordNet 3.0 noun synset ``<offset>``, and a
class is dropped when one of the rule's synsets is the class itself or one of its hypernyms
(following every hypernym and instance-hypernym link, not only the first). The groups:

* scenes and landforms -- ``geological_formation`` (alp, cliff, coral reef, lakeside, valley, ...);
* structures and places -- ``structure, construction`` (buildings, shops, bridges, fences, walls,
  monuments, fountains, docks, ...);
* food, drink and substances -- ``matter`` (dishes, bread, fruit, vegetables, beverages, hay,
  powders, tissue);
* plants and fungi -- ``plant_part``, ``plant, flora``, ``fungus`` (flowers, seeds, ears of corn,
  mushrooms);
* textures, fabrics and sheet-like coverings -- ``fabric``, ``floor_cover``, ``blind, screen``,
  ``screen`` (fire / window screens, nets), ``screen, cover`` (shoji), ``roof``, ``bedclothes``;
* worn garments -- ``clothing`` (the detector sees the wearer, not the garment; the garment deforms);
* balls -- ``ball`` (game equipment: spheres without parts that could correspond);
* printed matter, puzzles and 2-D designs -- ``puzzle``, ``print_media``, ``web_site``, ``wrapping``;
* crowd-prone small items, webs and textures, one synset each -- bubble, chain, chain mail, spider
  web, nail, screw, safety pin, matchstick, knot, stage.

The list is rebuilt from a WordNet 3.0 database (``data.noun``, e.g. Debian's ``wordnet-base`` in
``/usr/share/wordnet`` or NLTK's ``corpora/wordnet``) with
``python -m semcorr.training.data.imagenet_filters --wordnet /usr/share/wordnet --output FILE``;
the ImageNet class ids, lemmas and definitions come from the files timm ships
(``timm.data.ImageNetInfo``). The shipped list drops 228 classes and keeps 772 (the paper: 321 and
679); the JSON file records the rule, the group of every dropped class and its name.

The single-instance filter takes any *detector*: a callable ``PIL image -> detections``, where the
detections are the ``object-detection`` pipeline's list of ``{"score", "label", "box": {"xmin",
"ymin", "xmax", "ymax"}}`` or a pair ``(boxes (N, 4) as x1, y1, x2, y2 pixels, scores (N,))``.
:func:`resolve_detector` builds one from a config value: ``"none"`` (the filter is skipped), a
``"module:function"`` import path, or a transformers model id / folder (default
``facebook/detr-resnet-50``, trained on COCO) run through ``pipeline("object-detection")``. An
image passes when exactly one detection scores above the threshold (0.9 in the paper); its box is
then the image's box in SC-ImageNet.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: The drop list shipped with semcorr (JSON: the rule, the dropped wnids, their groups and names).
DEFAULT_DROP_LIST = Path(__file__).resolve().parents[2] / "hub_datasets" / "data" / "sc_imagenet_drop_classes.json"
#: Where a WordNet 3.0 database is looked for when none is given.
WORDNET_DIRS = ("/usr/share/wordnet", "~/nltk_data/corpora/wordnet", "/usr/share/nltk_data/corpora/wordnet")
WNID = re.compile(r"^n\d{8}$")

#: The rule: ``(group, [(wnid of a WordNet 3.0 synset, its first lemma), ...])``; a class is dropped
#: when one of these synsets is the class or one of its hypernyms.
DROP_RULE: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("scenes and landforms", (("n09287968", "geological_formation"),)),
    ("structures and places", (("n04341686", "structure"),)),
    ("food, drink and substances", (("n00020827", "matter"),)),
    ("plants and fungi", (("n13086908", "plant_part"), ("n00017222", "plant"), ("n12992868", "fungus"))),
    ("textures, fabrics and sheet-like coverings", (
        ("n03309808", "fabric"), ("n03366823", "floor_cover"), ("n02851099", "blind"), ("n04151581", "screen"),
        ("n04151940", "screen"), ("n04105068", "roof"), ("n02820210", "bedclothes"))),
    ("worn garments", (("n03051540", "clothing"),)),
    ("balls", (("n02778669", "ball"),)),
    ("printed matter, puzzles and 2-D designs", (
        ("n04028315", "puzzle"), ("n06263609", "print_media"), ("n06359193", "web_site"), ("n04605726", "wrapping"))),
    ("crowd-prone small items, webs and textures", (
        ("n09229709", "bubble"), ("n02999410", "chain"), ("n03000247", "chain_mail"), ("n04275548", "spider_web"),
        ("n03804744", "nail"), ("n04153751", "screw"), ("n04127249", "safety_pin"), ("n03729826", "matchstick"),
        ("n03627232", "knot"), ("n04296562", "stage"))),
)


# -- ImageNet class names ------------------------------------------------------------------------------
def imagenet_classes() -> dict[str, str]:
    """``{wnid: "lemma, lemma"}`` of the 1,000 ImageNet-1k classes in their standard (sorted wnid) order, from timm."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return {wnid: info.label_name_to_description(wnid) for wnid in info.label_names()}


def is_wnid(name: str) -> bool:
    return bool(WNID.match(str(name)))


# -- WordNet --------------------------------------------------------------------------------------------
def find_wordnet(wordnet_dir=None) -> Path:
    """The folder holding WordNet 3.0's ``data.noun`` (``wordnet_dir`` or a usual place).

    Raises:
        ValueError: none found; the message says how to get one.
    """
    candidates = [wordnet_dir] if wordnet_dir is not None else list(WORDNET_DIRS)
    for candidate in candidates:
        folder = Path(candidate).expanduser()
        if (folder / "data.noun").is_file():
            return folder
    raise ValueError(f"no WordNet 3.0 database (data.noun) in {', '.join(map(str, candidates))}; install Debian's "
                     "wordnet-base (/usr/share/wordnet) or NLTK's wordnet corpus and pass its folder")


def read_wordnet_nouns(wordnet_dir=None) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``(hypernyms, lemmas)`` of every noun synset of WordNet 3.0, keyed by ``n<offset>``.

    ``hypernyms`` follows the ``@`` (hypernym) and ``@i`` (instance hypernym) pointers of ``data.noun``.
    """
    hypernyms, lemmas = {}, {}
    with open(find_wordnet(wordnet_dir) / "data.noun", encoding="latin-1") as handle:
        for line in handle:
            if line.startswith("  "):  # the licence header
                continue
            fields = line.partition(" | ")[0].split()
            offset, count = fields[0], int(fields[3], 16)
            lemmas["n" + offset] = [fields[4 + 2 * i] for i in range(count)]
            pointers_at = 4 + 2 * count
            pointers = fields[pointers_at + 1: pointers_at + 1 + 4 * int(fields[pointers_at])]
            hypernyms["n" + offset] = ["n" + pointers[i + 1] for i in range(0, len(pointers), 4)
                                       if pointers[i] in ("@", "@i") and pointers[i + 2] == "n"]
    return hypernyms, lemmas


def _ancestors(wnid: str, hypernyms: dict[str, list[str]]) -> set[str]:
    seen, stack = set(), [wnid]
    while stack:
        for parent in hypernyms.get(stack.pop(), ()):
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def derive_drop_list(wordnet_dir=None, classes=None) -> dict[str, str]:
    """``{wnid: group}`` of the ImageNet classes :data:`DROP_RULE` drops (see the module docstring).

    Raises:
        ValueError: no WordNet database, or a synset of the rule whose lemma is not the one the rule
            names (another WordNet version).
    """
    hypernyms, lemmas = read_wordnet_nouns(wordnet_dir)
    for _, synsets in DROP_RULE:
        for wnid, lemma in synsets:
            if lemma not in lemmas.get(wnid, ()):
                raise ValueError(f"WordNet synset {wnid} is {lemmas.get(wnid)}, the rule expects {lemma!r}: "
                                 "not WordNet 3.0 (the version of ImageNet's ids)")
    dropped = {}
    for wnid in classes if classes is not None else imagenet_classes():
        lineage = _ancestors(wnid, hypernyms) | {wnid}
        for group, synsets in DROP_RULE:
            if any(synset in lineage for synset, _ in synsets):
                dropped[wnid] = group
                break
    return dropped


def drop_list_document(dropped: dict[str, str]) -> dict:
    """The JSON document of a drop list: the rule, the counts and every dropped class with its group and name."""
    names = imagenet_classes()
    groups = {group: [f"{wnid} {lemma}" for wnid, lemma in synsets] for group, synsets in DROP_RULE}
    return {
        "description": "ImageNet-1k classes semcorr leaves out of SC-ImageNet. Rule: a class is dropped when one of the "
                       "WordNet 3.0 synsets of a group is the class itself or one of its hypernyms (every hypernym and "
                       "instance-hypernym link). Huang et al. (ICCV 2023) removed 321 classes but did not publish "
                       "their list; this one is semcorr's. Rebuild: python -m semcorr.training.data.imagenet_filters "
                       "--wordnet /usr/share/wordnet --output FILE",
        "rule": groups,
        "num_classes": len(names), "num_dropped": len(dropped), "num_kept": len(names) - len(dropped),
        "dropped": [{"wnid": wnid, "group": dropped[wnid], "name": names.get(wnid, "")} for wnid in sorted(dropped)],
        "wnids": sorted(dropped),
    }


def load_drop_list(spec) -> set[str]:
    """The class ids a drop list names.

    Args:
        spec: ``"default"`` (:data:`DEFAULT_DROP_LIST`), ``"none"`` / None (drop nothing), a JSON file
            with a ``"wnids"`` list, or a text file of one class id per line (``#`` starts a comment).

    Raises:
        ValueError: the file is missing or unreadable.
    """
    if spec is None or spec == "none":
        return set()
    path = DEFAULT_DROP_LIST if spec == "default" else Path(spec).expanduser()
    if not path.is_file():
        raise ValueError(f"data.drop_classes: file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            return {str(wnid) for wnid in json.loads(text)["wnids"]}
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"data.drop_classes: {path} is not a JSON object with a 'wnids' list ({error})") from None
    return {line.split("#", 1)[0].strip() for line in text.splitlines()} - {""}


# -- the single-instance filter ---------------------------------------------------------------------------
Detector = Callable[[object], object]


@dataclass
class Screening:
    """What the detector says of one image: how many objects score above the threshold, the box of the best."""

    count: int
    box: list[float] | None  # x1, y1, x2, y2 in pixels of the image
    score: float | None


def detections(output) -> tuple[list[list[float]], list[float]]:
    """``(boxes, scores)`` of a detector's output (the pipeline's list of dicts, or ``(boxes, scores)``)."""
    if isinstance(output, tuple) and len(output) == 2:
        boxes, scores = output
        boxes = [[float(v) for v in box] for box in (boxes.tolist() if hasattr(boxes, "tolist") else boxes)]
        scores = [float(v) for v in (scores.tolist() if hasattr(scores, "tolist") else scores)]
        return boxes, scores
    boxes, scores = [], []
    for item in output or []:
        box = item["box"]
        boxes.append([float(box["xmin"]), float(box["ymin"]), float(box["xmax"]), float(box["ymax"])])
        scores.append(float(item["score"]))
    return boxes, scores


def screen_image(detector: Detector, image, threshold: float) -> Screening:
    """Run ``detector`` on a PIL image; the detections scoring above ``threshold``, counted."""
    boxes, scores = detections(detector(image))
    above = [i for i, score in enumerate(scores) if score > threshold]
    if not above:
        return Screening(0, None, None)
    best = max(above, key=lambda i: scores[i])
    return Screening(len(above), boxes[best], scores[best])


class PipelineDetector:
    """A transformers ``object-detection`` pipeline as a detector (one image per call)."""

    def __init__(self, model: str, threshold: float, device=None):
        from transformers import pipeline

        self.model = model
        self.threshold = threshold
        self.pipe = pipeline("object-detection", model=model, device=device)

    def __call__(self, image):
        return self.pipe(image, threshold=self.threshold)


def resolve_detector(spec: str | None, threshold: float, device=None) -> Detector | None:
    """The detector a config value names (see the module docstring); None for ``"none"``.

    Raises:
        ValueError: the detector cannot be loaded (offline without its weights, a bad import path);
            the message names ``--detector none``, the switch that skips the filter.
    """
    if spec is None or spec == "none":
        return None
    skip = ("run with --detector none to skip the single-instance filter (the dataset card then says it was "
            "skipped), or give a local detector folder or module:function")
    if ":" in spec and not Path(spec).expanduser().exists() and not spec.startswith(("http:", "https:")):
        module, _, name = spec.partition(":")
        try:
            detector = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"data.detector: cannot import {spec!r} ({error}); {skip}") from None
        if not callable(detector):
            raise ValueError(f"data.detector: {spec!r} is not callable; {skip}")
        return detector
    try:
        return PipelineDetector(spec, threshold, device=device)
    except Exception as error:  # offline Hub, missing weights, a model that is no detector: all one message
        reason = " ".join(str(error).split())[:300]
        raise ValueError(f"data.detector: cannot load the object detector {spec!r} ({type(error).__name__}: "
                         f"{reason}); {skip}") from None


# -- CLI: rebuild the shipped list -------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m semcorr.training.data.imagenet_filters",
                                     description="Rebuild SC-ImageNet's class drop list from WordNet 3.0.")
    parser.add_argument("--wordnet", help="folder with WordNet 3.0's data.noun (default: the usual places)")
    parser.add_argument("--output", default=str(DEFAULT_DROP_LIST), help="JSON file to write (default: the shipped list)")
    args = parser.parse_args(argv)
    try:
        dropped = derive_drop_list(args.wordnet)
    except ValueError as error:
        print(f"imagenet_filters: error: {error}", file=sys.stderr)
        return 2
    from semcorr.utils import atomic_write_json

    document = drop_list_document(dropped)
    atomic_write_json(args.output, document)
    for group, _ in DROP_RULE:
        print(f"{sum(1 for g in dropped.values() if g == group):4d}  {group}")
    print(f"dropped {document['num_dropped']} of {document['num_classes']} classes, kept {document['num_kept']}: "
          f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
