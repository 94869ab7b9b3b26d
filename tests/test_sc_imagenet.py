"""SC-ImageNet: the labelling job (filters, pairs, labels, selection), its resume after a kill on 2
processes, the label quality of the consistency selection, and the dataset's layouts (Hub, SPair-like).

The "ImageNet" here is an ImageNet-layout folder of warped scikit-image photos (a class per photo),
with one unreadable file, one class on the drop list and a fake detector that sees two objects in one
marked image.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from semcorr.hub_datasets.sc_imagenet import (
    export_spair_layout,
    import_spair_layout,
    layout_origin,
    load_sc_imagenet,
    push_to_hub,
)
from semcorr.training.label_sc_imagenet import main, read_labels, read_screen

PHOTOS = ("astronaut.png", "rocket.jpg", "coffee.png", "camera.png")
MEMBERS, SIZE = 6, (96, 96)
FAKE_DETECTOR = '''
def detect(image):
    """One object scoring 0.99 (and a weak one); a second strong one where the top-left corner is red."""
    width, height = image.size
    found = [{"score": 0.99, "label": "thing", "box": {"xmin": 4.0, "ymin": 6.0, "xmax": width - 4.0, "ymax": height - 2.0}},
             {"score": 0.4, "label": "thing", "box": {"xmin": 0.0, "ymin": 0.0, "xmax": 10.0, "ymax": 10.0}}]
    red, green, blue = image.getpixel((2, 2))
    if red > 200 and green < 60 and blue < 60:
        found.append({"score": 0.95, "label": "thing", "box": {"xmin": 0.0, "ymin": 0.0, "xmax": 12.0, "ymax": 12.0}})
    return found
'''
SMALL_STAGE = dict(volume_embed_dim=8, volume_depth=2, volume_heads=2, volume_window=2, volume_fold=1)
TINY_MIL = dict(backbone="resnet18", backbone_layers=[2], backbone_weights=None, image_size=[64, 64],
                image_stage=SMALL_STAGE, region_stage=SMALL_STAGE, pixel_stage=SMALL_STAGE, saliency="none",
                num_suspects=4, region_image_size=32, num_region_pairs=3, num_pseudo_pairs=6)
FEATURES = {"pair_id", "category", "category_name", "source_image_path", "target_image_path", "source_image",
            "target_image", "source_keypoints", "target_keypoints", "keypoint_scores", "keypoint_consistency",
            "consistency_score", "source_bbox", "target_bbox", "source_image_size", "target_image_size",
            "viewpoint_variation", "scale_variation", "truncation", "occlusion"}


def save_generator(folder: Path, seed: int = 0, **fields) -> Path:
    from semcorr.modeling import image_processor_for
    from semcorr.training.train_cascaded_mil import build_model

    model = build_model(fields, seed).eval()
    model.save_pretrained(folder)
    image_processor_for(model.config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from semcorr.hub_datasets.skimage_pairs import write_warped_classes

    root = tmp_path_factory.mktemp("sc-imagenet")
    imagenet = write_warped_classes(root / "imagenet", photos=PHOTOS, members=MEMBERS, size=SIZE)
    marked = np.array(Image.open(imagenet / "astronaut" / "000.png").convert("RGB"))
    marked[:16, :16] = (255, 0, 0)
    Image.fromarray(marked).save(imagenet / "astronaut" / "000.png")
    (imagenet / "coffee" / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (root / "drop.txt").write_text("# classes the test drops\ncamera\n")
    (root / "detectors").mkdir()
    (root / "detectors" / "fake_detector.py").write_text(FAKE_DETECTOR)
    generator = save_generator(root / "generator", **TINY_MIL)
    return SimpleNamespace(root=root, imagenet=imagenet, generator=generator, detectors=root / "detectors")


def job_args(workspace, output: Path, *extra) -> list[str]:
    return ["--images", str(workspace.imagenet), "--generator", str(workspace.generator), "--output-dir", str(output),
            "--detector", "fake_detector:detect", "--drop-classes", str(workspace.root / "drop.txt"),
            "--num-pairs", "6", "--num-thirds", "3", "--shard-size", "1", "--keep-fraction", "0.5",
            "--num-threads", "1", "--set", "labels.validation_fraction=0.25", "--set", "labels.match_batch_size=2",
            *extra]


@pytest.fixture(scope="module")
def labelled(workspace):
    """One uninterrupted 1-process run (in this process)."""
    patch = pytest.MonkeyPatch()
    patch.syspath_prepend(str(workspace.detectors))
    output = workspace.root / "one-process"
    assert main(job_args(workspace, output)) == 0
    patch.undo()
    return output


def rows_of(folder: Path) -> dict[str, list[dict]]:
    import pyarrow.parquet as pq

    return {split: [row for file in sorted((folder / "data").glob(f"{split}-*.parquet"))
                    for row in pq.read_table(file).to_pylist()] for split in ("train", "validation")}


# -- the job ------------------------------------------------------------------------------------------------
def test_filters_pairs_labels_and_dataset(workspace, labelled):
    summary = json.loads((labelled / "summary.json").read_text())
    # 4 classes x 6 warps + 1 broken file; camera dropped; coffee/broken.JPEG unreadable; astronaut/000 rejected
    assert summary["images_seen"] == 25 and summary["classes_dropped"] == 1 and summary["images_in_dropped_classes"] == 6
    assert summary["images_screened"] == 19 and summary["images_unreadable"] == 1
    assert summary["images_rejected_by_detector"] == 1 and summary["images_passed"] == 17
    assert summary["images_paired"] == 16 and summary["pairs_labelled"] == 8  # astronaut's 5 leave one out

    screened = {record["path"]: record for record in read_screen(labelled / "screen")}
    assert screened["coffee/broken.JPEG"]["status"] == "unreadable"
    assert screened["astronaut/000.png"]["status"] == "rejected" and screened["astronaut/000.png"]["detections"] == 2
    assert not any(path.startswith("camera/") for path in screened)

    reader, decode = read_labels(labelled / "labels")
    images = [int(i) for shard in range(len(reader.shards)) for key in ("source", "target")
              for i in reader.decoded(shard, decode)[key]]
    assert len(images) == len(set(images)) == 16  # every image in at most one pair
    ok = {record["image"] for record in screened.values() if record["status"] == "ok"}
    assert set(images) <= ok and len(ok - set(images)) == 1

    splits = {split: load_sc_imagenet(labelled / "dataset", workspace.imagenet, split=split)
              for split in ("train", "validation")}
    assert set(splits["train"].features) == FEATURES
    assert isinstance(splits["train"].features["source_image"], datasets.Image)
    assert isinstance(splits["train"].features["category"], datasets.ClassLabel)
    rows = [row for split in splits.values() for row in split]
    assert len(splits["validation"]) == 1 and len(rows) == summary["pairs_kept"] == 4
    kept_images = [row[f"{side}_image_path"] for row in rows for side in ("source", "target")]
    assert len(kept_images) == len(set(kept_images)) == summary["images_kept"] == 8  # 50 % of the 16 paired
    assert not {"astronaut/000.png", "coffee/broken.JPEG"} & set(kept_images)
    names = splits["train"].features["category"].names
    assert "camera" not in names
    for row in rows:
        assert row["source_image"].size == SIZE[::-1] and row["source_image_size"] == list(SIZE)
        assert row["source_bbox"] == [4.0, 6.0, SIZE[1] - 4.0, SIZE[0] - 2.0]  # the detector's box
        assert row["source_image_path"].split("/")[0] == names[row["category"]] == row["target_image_path"].split("/")[0]
        count = len(row["source_keypoints"])
        assert 0 < count <= 6 and count == len(row["target_keypoints"]) == len(row["keypoint_consistency"])
        for side in ("source", "target"):
            points = np.asarray(row[f"{side}_keypoints"])
            assert (points >= 0).all() and (points[:, 0] <= SIZE[1]).all() and (points[:, 1] <= SIZE[0]).all()
        assert math.isclose(row["consistency_score"], float(np.mean(row["keypoint_consistency"])), rel_tol=1e-5)
    # the kept pairs are the most consistent ones
    consistency = [float(v) for shard in range(len(reader.shards)) for v in reader.decoded(shard, decode)["consistency"]]
    kept_scores = sorted(row["consistency_score"] for row in rows)
    assert min(kept_scores) >= sorted(consistency)[-5] - 1e-6

    plain = datasets.load_dataset(str(labelled / "dataset"))  # no loading script: the annotation columns
    assert set(plain) == {"train", "validation"} and "source_image" not in plain["train"].column_names
    card = (labelled / "dataset" / "README.md").read_text()
    assert "| images rejected by the detector (not exactly one object) | 1 |" in card and "fake_detector:detect" in card


def test_default_detector_offline_stops_before_any_work(workspace, datasets_offline, capsys, tmp_path):
    args = [arg for arg in job_args(workspace, tmp_path / "out") if arg != "fake_detector:detect"]
    args.remove("--detector")
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "facebook/detr-resnet-50" in error and "--detector none" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (["--keep-fraction", "1.5"], "labels.keep_fraction must be in (0, 1]"),
    (["--set", "labels.thirds=4"], "unknown key(s) labels.thirds"),
    (["--drop-classes", "missing.txt"], "data.drop_classes: file not found"),
])
def test_bad_options_fail_in_one_line(workspace, capsys, tmp_path, extra, message):
    assert main(job_args(workspace, tmp_path / "out", *extra)) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and message in error


def descendants(pid: int) -> list[int]:
    """The processes started by ``pid``, recursively (Linux ``/proc``)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def test_killed_two_process_run_resumes_to_the_one_process_dataset(workspace, labelled, tmp_path, capsys):
    output = workspace.root / "two-processes"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1",
           "PYTHONPATH": os.pathsep.join([str(workspace.detectors), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               "-m", "semcorr.training.label_sc_imagenet", *job_args(workspace, output)]
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        first_shard, deadline = output / "labels" / "shard-00000.json", time.monotonic() + 300  # its sidecar: complete
        while not first_shard.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        for pid in [process.pid, *descendants(process.pid)]:  # torchrun starts its workers in sessions of their own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait()
    assert first_shard.exists(), (tmp_path / "killed.log").read_text()[-3000:]
    assert not (output / "labels" / "index.json").exists() and not (output / "dataset").exists()
    done = len(list((output / "labels").glob("shard-*.json")))
    assert 1 <= done < 8

    # resumed by one process (in this one): the shards the two processes finished are reused as they are
    patch = pytest.MonkeyPatch()
    patch.syspath_prepend(str(workspace.detectors))
    assert main(job_args(workspace, output)) == 0
    patch.undo()
    assert f"{8 - done} shard(s) written, {done} already done" in capsys.readouterr().out
    assert rows_of(output / "dataset") == rows_of(labelled / "dataset")  # row for row, whatever the process count
    resumed, reference = (json.loads((folder / "summary.json").read_text()) for folder in (output, labelled))
    assert {k: v for k, v in resumed.items() if k != "dataset"} == {k: v for k, v in reference.items() if k != "dataset"}


# -- label quality ------------------------------------------------------------------------------------------
QUALITY_PHOTOS, QUALITY_MEMBERS, QUALITY_SIZE = ("chelsea.png", "coffee.png", "motorcycle_left.png"), 10, (160, 160)


def test_consistency_selection_keeps_the_more_accurate_labels(tmp_path):
    """Held-out photos, 10 known warps each (a class per photo); the untrained generator on the embedded
    ImageNet EfficientNet-Lite0 at 128^2 (its stages start as the backbone's cosine volume)."""
    from semcorr.hub_datasets.skimage_pairs import skimage_data_dir, warp_generator
    from semcorr.modeling.image_processing_semcorr import image_to_unit_tensor
    from semcorr.modeling.ops.geometry import grid_to_pixels, pixels_to_grid, sample_grid_at

    imagenet, warps = tmp_path / "imagenet", {}
    generator = warp_generator(0.35, seed=0)
    for name in QUALITY_PHOTOS:
        photo = image_to_unit_tensor(Image.open(skimage_data_dir() / name).convert("RGB"), QUALITY_SIZE)
        batch = generator(photo[None].repeat(QUALITY_MEMBERS, 1, 1, 1))
        (imagenet / Path(name).stem).mkdir(parents=True)
        for member in range(QUALITY_MEMBERS):
            path = f"{Path(name).stem}/{member:03d}.png"
            pixels = (batch["target_pixel_values"][member].permute(1, 2, 0) * 255).round().byte().numpy()
            Image.fromarray(pixels).save(imagenet / path)
            warps[path] = {key: batch[key][member] for key in ("grid_trg_to_src", "valid_trg", "grid_src_to_trg", "valid_src")}
    stage = dict(volume_embed_dim=8, volume_depth=1, volume_heads=2, volume_window=3, volume_fold=1)
    save_generator(tmp_path / "generator", backbone="tf_efficientnet_lite0", backbone_weights="embedded",
                   backbone_layers=[3, 4], image_size=[128, 128], image_stage=stage, region_stage=stage,
                   pixel_stage=stage, saliency="none", num_suspects=4, region_image_size=64, num_region_pairs=4)
    assert main(["--images", str(imagenet), "--generator", str(tmp_path / "generator"), "--output-dir",
                 str(tmp_path / "out"), "--detector", "none", "--drop-classes", "none", "--num-pairs", "16",
                 "--num-thirds", "3", "--keep-fraction", "0.3", "--shard-size", "8", "--num-threads", "1",
                 "--set", "labels.validation_fraction=0"]) == 0

    def true_targets(points, source, target):
        """Where source points (N, 2) truly land in the target: through the photo both are warps of."""
        start = pixels_to_grid(points[None], QUALITY_SIZE)
        in_photo = sample_grid_at(warps[source]["grid_trg_to_src"][None], start)
        landed = sample_grid_at(warps[target]["grid_src_to_trg"][None], in_photo)
        defined = ((sample_grid_at(warps[source]["valid_trg"][None, None].float(), start)[..., 0] > 0.99)
                   & (sample_grid_at(warps[target]["valid_src"][None, None].float(), in_photo)[..., 0] > 0.99))
        return grid_to_pixels(landed, QUALITY_SIZE)[0], defined[0]

    kept_ids = {row["pair_id"] for row in rows_of(tmp_path / "out" / "dataset")["train"]}
    screened = {record["image"]: record["path"] for record in read_screen(tmp_path / "out" / "screen")}
    reader, decode = read_labels(tmp_path / "out" / "labels")
    errors = {"kept": [], "dropped": []}
    for shard in range(len(reader.shards)):
        tensors = reader.decoded(shard, decode)
        for row, pair_index in enumerate(tensors["pair_index"].tolist()):
            source, target = screened[int(tensors["source"][row])], screened[int(tensors["target"][row])]
            found = tensors["found"][row].bool()
            truth, defined = true_targets(tensors["source_points"][row][found], source, target)
            error = (tensors["target_points"][row][found] - truth).norm(dim=-1)[defined]
            pair_id = f"{pair_index:06d}-{Path(source).stem}-{Path(target).stem}"
            errors["kept" if pair_id in kept_ids else "dropped"].append(error)
    assert len(errors["kept"]) == 4 and len(errors["dropped"]) == 11  # 30 % of 30 images: 4 of the 15 pairs
    side = max(QUALITY_SIZE)
    figures = {}
    for group, values in errors.items():
        error = torch.cat(values)
        figures[group] = {"labels": len(error), "pck@0.05": float((error <= 0.05 * side).float().mean()),
                          "pck@0.1": float((error <= 0.1 * side).float().mean()), "median_px": float(error.median())}
    print("label quality (kept vs dropped):", json.dumps(figures))
    assert figures["kept"]["pck@0.05"] > figures["dropped"]["pck@0.05"] + 0.1
    assert figures["kept"]["median_px"] < figures["dropped"]["median_px"]


# -- layouts --------------------------------------------------------------------------------------------------
def test_spair_export_reads_back_through_semcorrs_spair_builder(workspace, labelled, tmp_path):
    from semcorr.hub_datasets import load_benchmark

    export = export_spair_layout(labelled / "dataset", tmp_path / "spair", imagenet_root=workspace.imagenet)
    originals = {split: load_sc_imagenet(labelled / "dataset", split=split) for split in ("train", "validation")}
    for split, short in (("train", "trn"), ("validation", "val")):
        names = (export / "Layout" / "large" / f"{short}.txt").read_text().split()
        original = originals[split]
        wnids = original.features["category"].names
        assert names == [f"{row['pair_id']}:{wnids[row['category']]}" for row in original]
        for name, row in zip(names, original):  # what the authors' CATs / DHPF loaders parse
            assert name.split("-")[1] == Path(row["source_image_path"]).stem
            assert name.split("-")[2].split(":")[0] == Path(row["target_image_path"]).stem
            annotation = json.loads((export / "PairAnnotation" / short / f"{name}.json").read_text())
            assert {"src_kps", "trg_kps", "src_bndbox", "trg_bndbox", "category", "viewpoint_variation",
                    "scale_variation", "truncation", "occlusion"} <= set(annotation)
            assert (export / "JPEGImages" / annotation["category"] / annotation["src_imname"]).is_file()
        spair = load_benchmark("spair-71k", export, split=split, cache_dir=tmp_path / "cache")
        assert len(spair) == len(original)
        for got, row in zip(spair, original):
            assert got["pair_id"] == f"{row['pair_id']}:{wnids[row['category']]}"
            assert spair.features["category"].int2str(got["category"]) == wnids[row["category"]]
            for key in ("source_keypoints", "target_keypoints", "source_bbox", "target_bbox", "source_image_size"):
                assert got[key] == row[key], key
            assert got["source_image"].size == SIZE[::-1]


def test_authors_layout_import_round_trips(workspace, labelled, tmp_path):
    export = export_spair_layout(labelled / "dataset", tmp_path / "spair", images="none")
    assert not list((export / "JPEGImages").rglob("*.png"))
    imported = import_spair_layout(export, tmp_path / "imported", imagenet_root=workspace.imagenet)
    assert rows_of(imported) == rows_of(labelled / "dataset")
    assert layout_origin(imported) == "huang2023-release" and layout_origin(labelled / "dataset") == "semcorr"
    # an archive as the authors describe it: no semcorr extras, sizes from the images
    for file in (export / "PairAnnotation").rglob("*.json"):
        annotation = json.loads(file.read_text())
        for key in ("src_impath", "trg_impath", "src_imsize", "trg_imsize", "kps_scores", "kps_consistency",
                    "consistency_score", "kps_ids", "category_name"):
            annotation.pop(key)
        file.write_text(json.dumps(annotation))
    bare = rows_of(import_spair_layout(export, tmp_path / "bare", imagenet_root=workspace.imagenet))
    for split, rows in rows_of(labelled / "dataset").items():
        for got, row in zip(bare[split], rows, strict=True):
            assert got["consistency_score"] is None and got["keypoint_scores"] == []
            for key in ("pair_id", "category", "source_image_path", "target_keypoints", "source_bbox", "target_image_size"):
                assert got[key] == row[key], key
    with pytest.raises(ValueError, match="SPair-like layout"):
        load_sc_imagenet(export)


def test_push_to_hub_uploads_the_annotation_layout(workspace, labelled, tmp_path, monkeypatch):
    import shutil

    from huggingface_hub import HfApi

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, folder_path, repo_id, repo_type, **kwargs):
        calls.append(("upload_folder", repo_id, repo_type))
        shutil.copytree(folder_path, tmp_path / "hub" / repo_id)
        return f"https://huggingface.co/datasets/{repo_id}"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert push_to_hub(labelled / "dataset", "me/sc-imagenet", token="hf_x") == "https://huggingface.co/datasets/me/sc-imagenet"
    assert calls[0][:2] == ("create_repo", "me/sc-imagenet") and calls[0][2]["repo_type"] == "dataset"
    assert calls[1] == ("upload_folder", "me/sc-imagenet", "dataset")
    repo = tmp_path / "hub" / "me" / "sc-imagenet"
    assert not [p for p in repo.rglob("*") if p.suffix.lower() in (".png", ".jpeg", ".jpg")]
    assert rows_of(repo) == rows_of(labelled / "dataset")
    assert len(load_sc_imagenet(repo, workspace.imagenet, split="train")[0]["source_keypoints"]) > 0

    # images embedded (private use) and labels imported from the authors' release are refused
    export = export_spair_layout(labelled / "dataset", tmp_path / "spair", images="none")
    embedded = import_spair_layout(export, tmp_path / "embedded", imagenet_root=workspace.imagenet, origin="semcorr",
                                   embed_images=True)
    assert load_sc_imagenet(embedded, split="train")[0]["source_image"].size == SIZE[::-1]
    with pytest.raises(ValueError, match="forbid redistributing"):
        push_to_hub(embedded, "me/with-images")
    imported = import_spair_layout(export, tmp_path / "imported", imagenet_root=workspace.imagenet)
    with pytest.raises(ValueError, match="private"):
        push_to_hub(imported, "me/authors")
    assert len(calls) == 2


# -- the class drop list ---------------------------------------------------------------------------------------
def test_shipped_drop_list_follows_its_rule():
    from semcorr.training.data.imagenet_filters import (
        DEFAULT_DROP_LIST,
        DROP_RULE,
        derive_drop_list,
        imagenet_classes,
        load_drop_list,
    )

    document = json.loads(DEFAULT_DROP_LIST.read_text())
    dropped = load_drop_list("default")
    assert len(dropped) == document["num_dropped"] == 228 and document["num_kept"] == 772
    assert dropped <= set(imagenet_classes())
    assert {"n09472597", "n04366367", "n07753592", "n03598930", "n02802426"} <= dropped  # volcano, bridge, banana, jigsaw, ball
    assert not {"n02085620", "n02690373", "n03792782", "n02123045"} & dropped  # Chihuahua, airliner, bike, tabby
    assert {entry["group"] for entry in document["dropped"]} == {group for group, _ in DROP_RULE}
    if not Path("/usr/share/wordnet/data.noun").is_file():
        pytest.skip("no WordNet 3.0 database here (Debian: apt-get install wordnet-base) to re-derive the list")
    assert derive_drop_list("/usr/share/wordnet") == {entry["wnid"]: entry["group"] for entry in document["dropped"]}
