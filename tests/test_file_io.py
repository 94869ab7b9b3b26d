"""The one file-I/O module: atomic writes and folders, and the checksummed shard store."""

from __future__ import annotations

import json
import os
import stat

import pytest

from semcorr.utils import (
    ShardStore,
    atomic_directory,
    atomic_save,
    atomic_write_json,
    atomic_write_text,
    check_writable,
    read_json,
    sha256_bytes,
)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


# -- files ---------------------------------------------------------------------------------------------------
def test_atomic_write_json_is_strict_and_has_ordinary_permissions(tmp_path):
    import numpy as np

    path = atomic_write_json(tmp_path / "sub" / "r.json", {"pck": float("nan"), "n": np.int64(3), "x": (1.5, np.float32(2))})
    assert json.loads(path.read_text()) == {"pck": None, "n": 3, "x": [1.5, 2.0]}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert leftovers(path.parent) == []


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = atomic_write_text(tmp_path / "keep.txt", "old")

    def broken(temporary):
        temporary.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save(path, broken)
    assert path.read_text() == "old" and leftovers(tmp_path) == []


def test_errors_name_the_users_path_not_the_temporary_one(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError) as error:
        atomic_write_text(blocker / "out.json", "{}")  # a file where a folder should be
    assert str(blocker / "out.json") in str(error.value) and ".tmp" not in str(error.value)
    with pytest.raises(ValueError, match="it is a folder"):
        check_writable(tmp_path)
    with pytest.raises(ValueError, match="is not a folder"):
        check_writable(blocker / "out.json")
    assert check_writable(tmp_path / "new" / "deeper" / "out.json") == tmp_path / "new" / "deeper" / "out.json"


def test_atomic_directory_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("1")
    assert (target / "a.txt").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "b.txt").write_text("2")
            raise RuntimeError("killed")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"] and leftovers(tmp_path) == []
    with atomic_directory(target) as staging:  # replaces
        (staging / "c.txt").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c.txt"]
    with atomic_directory(target, overwrite=False) as staging:  # a cache: the first copy stays
        (staging / "d.txt").write_text("4")
    assert sorted(p.name for p in target.iterdir()) == ["c.txt"] and leftovers(tmp_path) == []


def test_read_json_is_none_for_missing_broken_or_non_object(tmp_path):
    assert read_json(tmp_path / "none.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1]")
    assert read_json(tmp_path / "bad.json") is None and read_json(tmp_path / "list.json") is None


# -- the shard store ---------------------------------------------------------------------------------------
def payload(shard: int) -> bytes:
    return json.dumps({"shard": shard, "rows": list(range(shard * 3, shard * 3 + 3))}).encode()


def written_store(root, config=None):
    store = ShardStore(root, "test-format", config or {"seed": 1}, num_pairs=8, shard_size=3, suffix=".jsonl",
                       what="labels")
    for shard in store.pending(list(range(store.num_shards))):
        store.write(shard, payload(shard))
    store.write_index(extra_key=5)
    return store


def test_store_layout_index_and_reading(tmp_path):
    store = written_store(tmp_path)
    assert store.num_shards == 3 and [store.bounds(k) for k in range(3)] == [(0, 3), (3, 6), (6, 8)]
    assert store.shards_of(0, 2) == [0, 2] and store.shards_of(1, 2) == [1]
    index = read_json(tmp_path / "index.json")
    assert index["format"] == "test-format" and index["extra_key"] == 5 and index["num_pairs"] == 8
    assert index["pair_to_shard"] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert [s["sha256"] for s in index["shards"]] == [sha256_bytes(payload(k)) for k in range(3)]
    reader = ShardStore.open(tmp_path, "test-format", what="labels")
    assert len(reader) == 8 and reader.locate(4) == (1, 1) and reader.locate(-1) == (2, 1)
    assert reader.decoded(1, json.loads)["rows"] == [3, 4, 5]
    with pytest.raises(IndexError):
        reader.locate(8)
    with pytest.raises(ValueError, match="not a other-format index"):
        ShardStore.open(tmp_path, "other-format")


def test_finished_shards_are_skipped_and_damaged_ones_redone(tmp_path):
    store = written_store(tmp_path)
    assert store.pending([0, 1, 2]) == []
    shard0, shard1 = store.shard_file(0), store.shard_file(1)
    shard0.write_bytes(shard0.read_bytes()[:5])  # killed mid-write: truncated, old sidecar left
    data = bytearray(shard1.read_bytes())
    data[-2] ^= 0x01  # tampered: same size, other content
    shard1.write_bytes(bytes(data))
    (tmp_path / ".shard-00002.abc123.tmp.jsonl").write_text("junk")  # a killed writer's temporary
    store.sidecar_file(2).unlink()  # a shard without its sidecar is not trusted either
    with pytest.raises(ValueError, match="corrupt labels shard .*shard-00000.*truncated"):
        ShardStore.open(tmp_path, "test-format", what="labels")
    assert store.pending([0, 1, 2]) == [0, 1, 2]
    store.write(2, payload(2))
    assert leftovers(tmp_path) == []
    other = ShardStore(tmp_path, "test-format", {"seed": 2}, num_pairs=8, shard_size=3, suffix=".jsonl")
    assert other.pending([2]) == [2]  # written for another config: not reused


def test_a_directory_of_another_run_is_refused(tmp_path):
    written_store(tmp_path)
    other = ShardStore(tmp_path, "test-format", {"seed": 2}, num_pairs=8, shard_size=3, what="labels")
    with pytest.raises(ValueError, match="holds labels of another run"):
        other.check_reusable()
    ShardStore(tmp_path, "test-format", {"seed": 1}, num_pairs=8, shard_size=3).check_reusable()  # the same run: fine


def test_reading_checks_the_bytes_it_decodes(tmp_path):
    written_store(tmp_path)
    reader = ShardStore.open(tmp_path, "test-format", what="labels")  # verified on open
    path = tmp_path / "shard-00001.jsonl"
    path.write_bytes(path.read_bytes().replace(b"3", b"9"))  # changed after the open
    with pytest.raises(ValueError, match="corrupt labels shard .*shard-00001.*sha256"):
        reader.decoded(1, json.loads)
