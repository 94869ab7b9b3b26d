"""PMD hypothesis generation: shards + index, determinism, resume, corruption, 2 processes, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from semcorr.training import generate_hypotheses as gh
from semcorr.training.data.hypotheses import FORMAT, load_hypotheses
from semcorr.utils import ShardStore, sha256_file
from tests.fixtures_benchmarks import write_pf_pascal

from .conftest import save_tiny_pmd_teacher, torchrun_module

N = 3


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return save_tiny_pmd_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def pascal_dir(tmp_path_factory) -> Path:
    return write_pf_pascal(tmp_path_factory.mktemp("pascal"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf-datasets-cache")


def args_for(teacher_dir, pascal_dir, cache_dir, output_dir, *extra):
    return ["--teacher", str(teacher_dir), "--pairs", "pf-pascal", "--data-dir", str(pascal_dir), "--split", "trn",
            "--output-dir", str(output_dir), "--num-hypotheses", str(N), "--shard-size", "3", "--seed", "7",
            "--cache-dir", str(cache_dir), "--num-threads", "1", *map(str, extra)]


def tensors_of(output_dir):
    store = load_hypotheses(output_dir)
    return [store[i] for i in range(len(store))]


@pytest.fixture(scope="module")
def first_run(teacher_dir, pascal_dir, cache_dir, tmp_path_factory, datasets_offline_module):
    output_dir = tmp_path_factory.mktemp("hyps") / "one"
    assert gh.main(args_for(teacher_dir, pascal_dir, cache_dir, output_dir, "--batch-size", 2)) == 0
    return output_dir


def test_shards_index_and_shapes(first_run, pascal_dir, cache_dir):
    from semcorr.hub_datasets import load_benchmark

    num_pairs = len(load_benchmark("pf-pascal", pascal_dir, split="trn", cache_dir=str(cache_dir)))
    index = json.loads((first_run / "index.json").read_text())
    assert index["num_pairs"] == num_pairs and index["num_hypotheses"] == N
    assert len(index["shards"]) == -(-num_pairs // 3)
    assert index["pair_to_shard"] == [i // 3 for i in range(num_pairs)]
    assert index["config"]["seed"] == 7 and index["config"]["shard_size"] == 3
    for shard, record in enumerate(index["shards"]):
        assert record["file"] == f"shard-{shard:05d}.safetensors"
        sidecar = json.loads((first_run / f"shard-{shard:05d}.json").read_text())
        assert sidecar["sha256"] == record["sha256"] == sha256_file(first_run / record["file"])
    from safetensors import safe_open

    with safe_open(str(first_run / "shard-00000.safetensors"), "pt") as handle:
        metadata = handle.metadata()
        assert handle.get_tensor("pair_index").tolist() == [0, 1, 2]
    assert metadata["num_hypotheses"] == str(N) and json.loads(metadata["source_grid_size"]) == [8, 8]

    store = load_hypotheses(first_run)
    assert len(store) == num_pairs
    for i in range(num_pairs):
        src_to_trg, trg_to_src = store[i]
        assert src_to_trg.shape == (N, 2, 8, 8) and trg_to_src.shape == (N, 2, 8, 8)
        assert torch.isfinite(src_to_trg).all() and src_to_trg.abs().max() <= 1.5
        assert not torch.equal(src_to_trg[0], src_to_trg[1])  # sampled, not N copies
        assert not torch.equal(trg_to_src[0], trg_to_src[1])
    assert not torch.equal(store[0][0], store[1][0])
    with pytest.raises(IndexError):
        store[num_pairs]


def test_batch_size_does_not_change_results(first_run, teacher_dir, pascal_dir, cache_dir, tmp_path, datasets_offline):
    other = tmp_path / "other"
    assert gh.main(args_for(teacher_dir, pascal_dir, cache_dir, other, "--batch-size", 3)) == 0
    for (a_st, a_ts), (b_st, b_ts) in zip(tensors_of(first_run), tensors_of(other), strict=True):
        assert torch.equal(a_st, b_st) and torch.equal(a_ts, b_ts)


def test_rerun_skips_and_truncated_shard_is_regenerated(first_run, teacher_dir, pascal_dir, cache_dir, tmp_path,
                                                        datasets_offline, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(first_run, out)
    original = tensors_of(out)
    shards = sorted(out.glob("shard-*.safetensors"))
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards}
    assert gh.main(args_for(teacher_dir, pascal_dir, cache_dir, out)) == 0
    assert {p.name: p.stat().st_mtime_ns for p in shards} == mtimes
    assert "0 shard(s) written" in capsys.readouterr().out

    # killed mid-write: shard 0 cut in half (old sidecar left), shard 1 without its sidecar
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt hypotheses shard .*shard-00000"):
        load_hypotheses(out)
    (out / "shard-00001.json").unlink()
    assert gh.main(args_for(teacher_dir, pascal_dir, cache_dir, out)) == 0
    assert shards[0].stat().st_size == len(data)
    assert shards[1].stat().st_mtime_ns != mtimes[shards[1].name]
    assert "2 shard(s) written" in capsys.readouterr().out
    for (a_st, a_ts), (b_st, b_ts) in zip(original, tensors_of(out), strict=True):
        assert torch.equal(a_st, b_st) and torch.equal(a_ts, b_ts)


def test_checksum_mismatch_is_rejected(first_run, tmp_path):
    import shutil

    out = tmp_path / "flip"
    shutil.copytree(first_run, out)
    path = out / "shard-00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="shard-00001.*sha256"):
        load_hypotheses(out)
    index = json.loads((out / "index.json").read_text())
    store = ShardStore(out, FORMAT, index["config"], index["num_pairs"], index["config"]["shard_size"])
    assert store.bounds(1) == (3, 4) and not store.is_complete(1) and store.is_complete(0)
    with pytest.raises(ValueError, match="no readable index.json"):
        load_hypotheses(tmp_path)


def test_changed_config_in_same_output_dir_is_refused(first_run, teacher_dir, pascal_dir, cache_dir, tmp_path,
                                                      datasets_offline, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(first_run, out)
    assert gh.main(args_for(teacher_dir, pascal_dir, cache_dir, out, "--seed", 8)) == 2
    assert "holds hypotheses of another run" in capsys.readouterr().err


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--teacher": "/nonexistent/teacher"}, "--teacher: directory not found"),
        ({"--data-dir": "/nonexistent/data"}, "--data-dir: directory not found"),
        ({"--num-hypotheses": "0"}, "--num-hypotheses must be >= 1"),
        ({"--shard-size": "0"}, "--shard-size must be >= 1"),
        ({"--pairs": "/nonexistent/pairs"}, "neither a benchmark"),
    ],
)
def test_bad_input_one_line_exit_2(teacher_dir, pascal_dir, cache_dir, tmp_path, capsys, change, message):
    argv = args_for(teacher_dir, pascal_dir, cache_dir, tmp_path / "out")
    for flag, value in change.items():
        argv[argv.index(flag) + 1] = value
    assert gh.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("generate_hypotheses: error:") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_dataset_directory_with_two_image_columns(first_run, teacher_dir, pascal_dir, cache_dir, tmp_path,
                                                  datasets_offline):
    from semcorr.hub_datasets import load_benchmark

    rows = load_benchmark("pf-pascal", pascal_dir, split="trn", cache_dir=str(cache_dir))
    rows = rows.select_columns(["source_image", "target_image"]).rename_columns({"source_image": "a", "target_image": "b"})
    rows.save_to_disk(str(tmp_path / "pairs"))
    out = tmp_path / "out"
    argv = ["--teacher", str(teacher_dir), "--pairs", str(tmp_path / "pairs"), "--output-dir", str(out),
            "--num-hypotheses", str(N), "--shard-size", "3", "--seed", "7", "--num-threads", "1"]
    assert gh.main(argv) == 0
    for (a_st, a_ts), (b_st, b_ts) in zip(tensors_of(first_run), tensors_of(out), strict=True):
        assert torch.equal(a_st, b_st) and torch.equal(a_ts, b_ts)


def torchrun(nproc, argv, port):
    result = torchrun_module("semcorr.training.generate_hypotheses", *argv, nproc=nproc, port=port,
                             env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_processes_match_one(first_run, teacher_dir, pascal_dir, cache_dir, tmp_path):
    out = tmp_path / "two"
    result = torchrun(2, args_for(teacher_dir, pascal_dir, cache_dir, out, "--batch-size", 1), 29531)
    assert "process 0: 1 shard(s) written" in result.stdout and "process 1: 1 shard(s) written" in result.stdout
    index = json.loads((out / "index.json").read_text())
    assert [s["file"] for s in index["shards"]] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    # Same noise, same pairs. A torchrun-launched process differs from a plain one by float rounding only
    # (bitwise equality across 1 and 2 torchrun processes: the slow test below).
    for (a_st, a_ts), (b_st, b_ts) in zip(tensors_of(first_run), tensors_of(out), strict=True):
        torch.testing.assert_close(b_st, a_st, atol=1e-5, rtol=0)
        torch.testing.assert_close(b_ts, a_ts, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_torchrun_one_and_two_processes_bitwise_equal(teacher_dir, pascal_dir, cache_dir, tmp_path):
    torchrun(1, args_for(teacher_dir, pascal_dir, cache_dir, tmp_path / "one"), 29532)
    torchrun(2, args_for(teacher_dir, pascal_dir, cache_dir, tmp_path / "two", "--batch-size", 1), 29533)
    for (a_st, a_ts), (b_st, b_ts) in zip(tensors_of(tmp_path / "one"), tensors_of(tmp_path / "two"), strict=True):
        assert torch.equal(a_st, b_st) and torch.equal(a_ts, b_ts)


def test_yaml_config_gives_the_same_shards_and_flags_win(first_run, teacher_dir, pascal_dir, cache_dir, tmp_path,
                                                         datasets_offline):
    import yaml

    options = {"data": dict(teacher=str(teacher_dir), pairs="pf-pascal", data_dir=str(pascal_dir), split="trn",
                            cache_dir=str(cache_dir)),
               "hypotheses": dict(num_hypotheses=N),
               "run": dict(output_dir=str(tmp_path / "ignored"), shard_size=3, seed=7, num_threads=1)}
    config = tmp_path / "hyps.yaml"
    config.write_text(yaml.safe_dump(options))
    out = tmp_path / "from-yaml"
    assert gh.main(["--config", str(config), "--output-dir", str(out)]) == 0  # the flag wins over the file
    assert not (tmp_path / "ignored").exists()
    for (a_st, a_ts), (b_st, b_ts) in zip(tensors_of(first_run), tensors_of(out)):
        assert torch.equal(a_st, b_st) and torch.equal(a_ts, b_ts)


@pytest.mark.parametrize("content, message", [
    ("hypotheses:\n  num_hypothesis: 4\n", "unknown key(s) hypotheses.num_hypothesis; valid keys of 'hypotheses':"),
    ("hypotheses:\n  num_hypotheses: 2.5\n", "hypotheses.num_hypotheses must be int"),
    ("run:\n  seed: 1\n", "--teacher is required"),
    ("num_hypotheses: 4\n", "config key 'num_hypotheses' is now 'hypotheses.num_hypotheses'"),  # the old flat file
    ("seed: 1\n", "config key 'seed' is now 'run.seed'"),
])
def test_bad_yaml_config_exits_2(content, message, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(content)
    assert gh.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err


def test_published_hypotheses_config_parses(tmp_path):
    teacher = tmp_path / "teacher"  # the published paths do not exist here: point them at stand-ins
    teacher.mkdir()
    (teacher / "config.json").write_text("{}")
    config = gh.HypothesesConfig.load("pmd_pf_pascal_hypotheses.yaml", ["data.teacher=" + str(teacher),
                                                                          "data.data_dir=" + str(tmp_path)])
    assert (config.data.pairs, config.data.split, config.hypotheses.num_hypotheses) == ("pf-pascal", "trn", 4)
    assert (config.run.shard_size, config.run.batch_size, config.run.seed) == (64, 8, 0)
