"""A checksummed store of per-pair records in shards: written once by many processes, verified on read.

Long jobs that produce something per image pair (PMD teacher hypotheses, SC-ImageNet pseudo labels)
write it through :class:`ShardStore`. Pairs ``0 .. N-1`` are cut into shards of ``shard_size``
consecutive pairs; process ``r`` of ``W`` writes the shards ``k`` with ``k % W == r``. On disk::

    shard-00000.safetensors   the payload of pairs [pair_start, pair_stop) (any bytes: safetensors, JSON, ...)
    shard-00000.json          sidecar: file, sha256, size, pair_start, pair_stop and the job's config
    ...
    index.json                format, format_version, config, every shard record, pair -> shard map (+ extras)

Crash safety: a shard is written atomically (temporary file, fsync, rename), then its sidecar, so
a sidecar only ever vouches for a complete file. A rerun skips a shard only when its sidecar was
written for the same config and the file's size and sha256 match; a missing, truncated or altered
shard is written again, never read. ``index.json`` is written by one process once every shard is
done; :meth:`ShardStore.open` checks every shard against it, and every read checks the bytes it
decodes.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from .file_io import atomic_write_bytes, atomic_write_json, read_json, sha256_bytes, sha256_file

INDEX_FILE = "index.json"
SHARD_PREFIX = "shard-"
_RECORD_KEYS = ("file", "sha256", "size", "pair_start", "pair_stop")


class ShardStore:
    """Writer and reader of one shard directory.

    Args:
        root: the directory.
        format: a name identifying what the shards hold (checked on read), e.g. ``"semcorr-pmd-hypotheses"``.
        config: everything the content depends on (JSON-serialisable); a rerun with another config
            in the same directory is refused, and only shards written for this config are reused.
        num_pairs: how many pairs the job covers.
        shard_size: pairs per shard.
        suffix: the payload files' extension (``".safetensors"``, ``".jsonl"``, ...).
        format_version: bumped when the payload layout changes.
        what: how messages call the content (``"hypotheses"``, ``"pseudo labels"``).
    """

    def __init__(self, root, format: str, config: dict, num_pairs: int, shard_size: int,
                 suffix: str = ".safetensors", format_version: int = 1, what: str = "the output"):
        if suffix == ".json":
            raise ValueError("a shard payload cannot use the suffix .json: the sidecars do (use .jsonl, .parquet, ...)")
        if num_pairs < 1 or shard_size < 1:
            raise ValueError(f"a shard store needs num_pairs >= 1 and shard_size >= 1, got {num_pairs} and {shard_size}")
        self.root = Path(root).expanduser()
        self.format, self.format_version, self.suffix = format, format_version, suffix
        self.config, self.num_pairs, self.shard_size = config, num_pairs, shard_size
        self.num_shards = -(-num_pairs // shard_size)
        self.what = what

    # -- plan ----------------------------------------------------------------------------------------
    def bounds(self, shard: int) -> tuple[int, int]:
        """``(pair_start, pair_stop)`` of a shard."""
        return shard * self.shard_size, min(self.num_pairs, (shard + 1) * self.shard_size)

    def shards_of(self, rank: int, world: int) -> list[int]:
        """The shards process ``rank`` of ``world`` writes."""
        return [shard for shard in range(self.num_shards) if shard % world == rank]

    def shard_file(self, shard: int) -> Path:
        return self.root / f"{SHARD_PREFIX}{shard:05d}{self.suffix}"

    def sidecar_file(self, shard: int) -> Path:
        return self.root / f"{SHARD_PREFIX}{shard:05d}.json"

    def check_reusable(self) -> None:
        """Refuse a directory that holds (the index of) a job with another config or format."""
        previous = read_json(self.root / INDEX_FILE)
        if previous is not None and (previous.get("config") != self.config or previous.get("format") != self.format):
            raise ValueError(f"{self.root} holds {self.what} of another run ({previous.get('format')}, config "
                             f"{previous.get('config')}); use a new output directory")

    # -- write ---------------------------------------------------------------------------------------
    def is_complete(self, shard: int) -> bool:
        """The shard and its sidecar exist, the sidecar is for this config and bounds, and the checksum matches."""
        path, sidecar = self.shard_file(shard), read_json(self.sidecar_file(shard))
        if sidecar is None or not path.is_file():
            return False
        start, stop = self.bounds(shard)
        if sidecar.get("config") != self.config or [sidecar.get("pair_start"), sidecar.get("pair_stop")] != [start, stop]:
            return False
        if sidecar.get("size") != path.stat().st_size:
            return False
        return sidecar.get("sha256") == sha256_file(path)

    def pending(self, shards: list[int]) -> list[int]:
        """The shards of ``shards`` that still have to be written."""
        return [shard for shard in shards if not self.is_complete(shard)]

    def write(self, shard: int, payload: bytes) -> dict:
        """Write one shard's payload, then its sidecar (both atomically); returns the sidecar record."""
        self.root.mkdir(parents=True, exist_ok=True)
        sidecar = self.sidecar_file(shard)
        sidecar.unlink(missing_ok=True)  # a stale sidecar must never vouch for the new file
        for leftover in self.root.glob(f".{self.shard_file(shard).stem}.*.tmp*"):  # from a killed writer
            leftover.unlink(missing_ok=True)
        path = atomic_write_bytes(self.shard_file(shard), payload)
        start, stop = self.bounds(shard)
        record = {"file": path.name, "shard": shard, "sha256": sha256_bytes(payload), "size": len(payload),
                  "pair_start": start, "pair_stop": stop, "config": self.config}
        atomic_write_json(sidecar, record)
        return record

    def write_index(self, **extra) -> dict:
        """Collect every sidecar into ``index.json`` (one process, after every shard is written)."""
        shards = []
        for shard in range(self.num_shards):
            record = read_json(self.sidecar_file(shard))
            if record is None or record.get("config") != self.config or not self.is_complete(shard):
                raise RuntimeError(f"{self.shard_file(shard)} is missing or incomplete after the job finished")
            shards.append({key: record[key] for key in _RECORD_KEYS})
        index = {"format": self.format, "format_version": self.format_version, "num_pairs": self.num_pairs, **extra,
                 "config": self.config, "shards": shards,
                 "pair_to_shard": [shard for shard in range(self.num_shards) for _ in range(*self.bounds(shard))]}
        atomic_write_json(self.root / INDEX_FILE, index)
        return index

    # -- read ----------------------------------------------------------------------------------------
    @staticmethod
    def open(root, format: str, verify: bool = True, cache_shards: int = 4, what: str = "") -> "ShardReader":
        """Open a finished store for reading (see :class:`ShardReader`)."""
        return ShardReader(root, format, verify=verify, cache_shards=cache_shards, what=what)


class ShardReader:
    """Read access to a finished shard directory, checked against its ``index.json``.

    ``reader.locate(i)`` gives ``(shard, row)`` of pair ``i``; ``reader.payload(shard)`` the verified
    bytes of a shard (the ``cache_shards`` most recent are kept decoded by :meth:`decoded`).

    Raises:
        ValueError: no index, another format, or (with ``verify``) a shard whose size or sha256
            differs from the index -- naming the shard.
    """

    def __init__(self, root, format: str, verify: bool = True, cache_shards: int = 4, what: str = ""):
        self.root = Path(root).expanduser()
        self.noun = f"{what} shard".strip()  # "hypotheses shard" in messages
        index = read_json(self.root / INDEX_FILE)
        if index is None:
            raise ValueError(f"{self.root}: no readable {INDEX_FILE} (the job did not finish?)")
        if index.get("format") != format:
            raise ValueError(f"{self.root / INDEX_FILE}: not a {format} index (format {index.get('format')!r})")
        self.index, self.config = index, index["config"]
        self.shards, self._pair_to_shard = index["shards"], index["pair_to_shard"]
        self._cache: OrderedDict[int, object] = OrderedDict()
        self._cache_shards = max(1, cache_shards)
        if verify:
            self.verify()

    def __len__(self) -> int:
        return len(self._pair_to_shard)

    def verify(self) -> None:
        """Check the size and sha256 of every shard against the index."""
        for record in self.shards:
            path = self.root / record["file"]
            if not path.is_file():
                raise ValueError(f"{self.noun} missing: {path}")
            size = path.stat().st_size
            if size != record["size"]:
                raise ValueError(f"corrupt {self.noun} {path}: {size} bytes, the index says {record['size']} (truncated?)")
            if sha256_file(path) != record["sha256"]:
                raise ValueError(f"corrupt {self.noun} {path}: its sha256 differs from {INDEX_FILE}")

    def locate(self, pair_index: int) -> tuple[int, int]:
        """``(shard, row in the shard)`` of a pair; negative indices count from the end."""
        if not isinstance(pair_index, int) or isinstance(pair_index, bool):
            raise TypeError(f"pair index must be an int, got {type(pair_index).__name__}")
        if pair_index < 0:
            pair_index += len(self)
        if not 0 <= pair_index < len(self):
            raise IndexError(f"pair {pair_index} out of range for {len(self)} pairs")
        shard = self._pair_to_shard[pair_index]
        return shard, pair_index - self.shards[shard]["pair_start"]

    def payload(self, shard: int) -> bytes:
        """The bytes of a shard, read once and checked against the index (what is checked is what is used)."""
        path = self.root / self.shards[shard]["file"]
        data = path.read_bytes()
        if sha256_bytes(data) != self.shards[shard]["sha256"]:
            raise ValueError(f"corrupt {self.noun} {path}: its sha256 differs from {INDEX_FILE}")
        return data

    def decoded(self, shard: int, decode):
        """``decode(payload(shard))``, cached for the ``cache_shards`` most recently used shards."""
        if shard in self._cache:
            self._cache.move_to_end(shard)
            return self._cache[shard]
        data = self.payload(shard)
        try:
            value = decode(data)
        except Exception as error:  # a decoder's own error type (SafetensorError, JSONDecodeError, ...)
            raise ValueError(f"corrupt {self.noun} {self.root / self.shards[shard]['file']}: {error}") from error
        self._cache[shard] = value
        while len(self._cache) > self._cache_shards:
            self._cache.popitem(last=False)
        return value

