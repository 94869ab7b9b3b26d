"""Sample PMD teacher flow hypotheses for real (unlabelled) image pairs, as checksummed shards.

Usage::

    python -m semcorr.training.generate_hypotheses --teacher runs/pmd-teacher-cpu-tiny/final \\
        --pairs pf-pascal --data-dir data/PF-PASCAL [--split trn] --output-dir hyps \\
        [--num-hypotheses 4] [--shard-size 64] [--batch-size 8] [--seed 0]
    python -m semcorr.training.generate_hypotheses --config pmd_pf_pascal_hypotheses.yaml   # the same as YAML
    torchrun --nproc_per_node 2 -m semcorr.training.generate_hypotheses ...      # 2 CPU processes
    accelerate launch [--multi_gpu --num_processes N] -m semcorr.training.generate_hypotheses ...

``--pairs`` is a benchmark name (``pf-pascal``, ``pf-willow``, ``spair-71k``; read from
``--data-dir`` with :func:`~semcorr.hub_datasets.load_benchmark`) or a path to a ``datasets``
directory (``save_to_disk`` output, or any folder ``load_dataset`` reads) whose rows hold two Image
columns (``source_image``/``target_image``, else the first two Image columns).

Output (``--output-dir``)::

    shard-00000.safetensors   hypotheses_src_to_trg (P, n, 2, h_s, w_s), hypotheses_trg_to_src (P, n, 2, h_t, w_t),
                              pair_index (P,) int64; string metadata (num_hypotheses, teacher, grid sizes, ...)
    shard-00000.json          sidecar: sha256 and size of the shard, its pairs, the run's config
    ...
    index.json                every shard (file, sha256, size, pairs), pair -> shard map, config

Grids are in normalised units ``[-1, 1]`` (``align_corners=False``) at the teacher's feature
resolution; ``hypotheses_src_to_trg[p, l, :, y, x]`` is where source cell ``(x, y)`` of pair
``pair_index[p]`` (its row in the dataset split) lands in the target under hypothesis ``l``.

Determinism: pair ``i`` draws its gate noise from a generator seeded by ``(seed, i)`` and the
teacher runs in eval mode on that pair alone, so the hypotheses do not depend on ``--batch-size``
(which only sets how many pairs are read and preprocessed at once) nor on the number of processes.
Shard ``k`` holds pairs ``[k * shard_size, (k + 1) * shard_size)``; process ``r`` of ``N`` writes
shards ``k`` with ``k % N == r``.

Crash safety: a shard is written to a temporary file and renamed into place (``os.replace``), then
its sidecar (sha256, size) is written the same way. A rerun skips a shard only when its sidecar is
valid, was written for the same config and matches the file's size and sha256; anything else (a
shard cut short, a shard without sidecar, a checksum mismatch) is regenerated, never read.
:func:`load_hypotheses` verifies every shard against ``index.json`` on open.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import OrderedDict
from pathlib import Path

import torch

from semcorr.utils import sha256_file as file_sha256

from semcorr.training.trainer import _seed

BENCHMARKS = ("pf-pascal", "pf-willow", "spair-71k")
SHARD_PREFIX = "shard-"
INDEX_FILE = "index.json"
FORMAT = "semcorr-pmd-hypotheses"
FORMAT_VERSION = 1


# -- files -----------------------------------------------------------------------------------------
def shard_name(shard: int) -> str:
    return f"{SHARD_PREFIX}{shard:05d}.safetensors"


def sidecar_name(shard: int) -> str:
    return f"{SHARD_PREFIX}{shard:05d}.json"




def _atomic_write_text(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(staging, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def shard_is_complete(output_dir: Path, shard: int, config: dict, pair_start: int, pair_stop: int) -> bool:
    """The shard and its sidecar exist, the sidecar was written for ``config`` and the checksum matches."""
    path, sidecar = output_dir / shard_name(shard), _read_json(output_dir / sidecar_name(shard))
    if sidecar is None or not path.is_file():
        return False
    if sidecar.get("config") != config or [sidecar.get("pair_start"), sidecar.get("pair_stop")] != [pair_start, pair_stop]:
        return False
    if sidecar.get("size") != path.stat().st_size:
        return False
    return sidecar.get("sha256") == file_sha256(path)


# -- inputs ----------------------------------------------------------------------------------------
def image_columns(dataset) -> tuple[str, str]:
    """``source_image``/``target_image`` when present, else the first two Image columns."""
    import datasets

    names = list(dataset.column_names)
    if "source_image" in names and "target_image" in names:
        return "source_image", "target_image"
    images = [name for name, feature in dataset.features.items() if isinstance(feature, datasets.Image)]
    if len(images) < 2:
        raise ValueError(f"the pairs dataset needs two Image columns (source_image, target_image); it has {names}")
    return images[0], images[1]


def load_pairs(pairs: str, data_dir: str | None, split: str | None, cache_dir: str | None = None):
    """The pair rows: a benchmark split, a ``save_to_disk`` directory or a folder ``load_dataset`` reads."""
    import datasets

    if pairs in BENCHMARKS:
        from semcorr.hub_datasets import load_benchmark

        return load_benchmark(pairs, data_dir, split=split or ("test" if pairs == "pf-willow" else "trn"),
                              cache_dir=cache_dir)
    path = Path(pairs).expanduser()
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        loaded = datasets.load_from_disk(str(path))
    else:
        loaded = datasets.load_dataset(str(path), split=split or "train", cache_dir=cache_dir)
    if isinstance(loaded, datasets.DatasetDict):
        wanted = split or "train"
        if wanted not in loaded:
            raise ValueError(f"{path}: no split {wanted!r} (splits: {', '.join(loaded)}); pass --split")
        loaded = loaded[wanted]
    return loaded


def validate_args(args: argparse.Namespace) -> None:
    """Every check that needs no model or data loading (one-line ValueErrors)."""
    teacher = Path(args.teacher).expanduser()
    if not teacher.is_dir():
        raise ValueError(f"--teacher: directory not found: {teacher}")
    if not (teacher / "config.json").is_file():
        raise ValueError(f"--teacher: {teacher} has no config.json (expected a save_pretrained directory)")
    if args.pairs in BENCHMARKS:
        if not args.data_dir:
            raise ValueError(f"--pairs {args.pairs} needs --data-dir (the extracted benchmark folder)")
        if not Path(args.data_dir).expanduser().is_dir():
            raise ValueError(f"--data-dir: directory not found: {Path(args.data_dir).expanduser()}")
    elif not Path(args.pairs).expanduser().exists():
        raise ValueError(
            f"--pairs: {args.pairs!r} is neither a benchmark ({', '.join(BENCHMARKS)}) nor an existing dataset directory"
        )
    for name in ("num_hypotheses", "shard_size", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def load_teacher(teacher: Path, label: str = "--teacher"):
    """The PMD teacher saved in ``teacher`` (eval mode); ``ValueError`` starting with ``label`` otherwise."""
    import semcorr.modeling  # noqa: F401  (registers the model types)
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(str(teacher))
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{label}: cannot load a model from {teacher}: {error}") from error
    if not hasattr(model, "sample_hypotheses"):
        raise ValueError(f"{label}: {teacher} holds a {type(model).__name__}, not a PMD teacher (no sample_hypotheses)")
    return model.eval()


def _load_teacher(teacher: Path):
    """The teacher and its image processor (the saved one, else one built from its config)."""
    from semcorr.modeling import image_processor_for
    from transformers import AutoImageProcessor

    model = load_teacher(teacher)
    if (teacher / "preprocessor_config.json").is_file():
        processor = AutoImageProcessor.from_pretrained(str(teacher))
    else:
        processor = image_processor_for(model.config)
    return model, processor


# -- generation ------------------------------------------------------------------------------------
def generate(args: argparse.Namespace) -> dict:
    """Write the shards of this process (and, on the main process, ``index.json``); returns the index."""
    from accelerate import Accelerator
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    teacher = Path(args.teacher).expanduser()
    output_dir = Path(args.output_dir).expanduser()
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    accelerator = Accelerator(cpu=cpu)
    world, rank = accelerator.num_processes, accelerator.process_index
    if args.num_threads:
        torch.set_num_threads(args.num_threads)

    model, processor = _load_teacher(teacher)
    model.to(accelerator.device)
    with accelerator.main_process_first():  # one process prepares the benchmark's Arrow cache
        dataset = load_pairs(args.pairs, args.data_dir, args.split, args.cache_dir)
    source_column, target_column = image_columns(dataset)
    num_pairs = len(dataset)
    if num_pairs == 0:
        raise ValueError(f"--pairs {args.pairs}: the split has no pairs")
    weights = teacher / "model.safetensors"
    config = {
        "teacher": str(teacher),
        "teacher_sha256": file_sha256(weights) if weights.is_file() else None,
        "pairs": args.pairs, "data_dir": args.data_dir, "split": args.split,
        "num_pairs": num_pairs, "num_hypotheses": args.num_hypotheses, "shard_size": args.shard_size,
        "seed": args.seed, "image_size": list(model.config.image_size),
    }
    num_shards = -(-num_pairs // args.shard_size)
    bounds = [(k * args.shard_size, min(num_pairs, (k + 1) * args.shard_size)) for k in range(num_shards)]
    mine = [k for k in range(num_shards) if k % world == rank]

    previous = _read_json(output_dir / INDEX_FILE)  # checked on every process, so all of them stop
    if previous is not None and previous.get("config") != config:
        raise ValueError(
            f"--output-dir {output_dir} holds hypotheses of another run (config {previous.get('config')}); "
            "use a new --output-dir"
        )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    todo = [k for k in mine if not shard_is_complete(output_dir, k, config, *bounds[k])]
    skipped = len(mine) - len(todo)
    bar = tqdm(total=sum(bounds[k][1] - bounds[k][0] for k in todo), desc="hypotheses", unit="pair",
               disable=not accelerator.is_local_main_process)
    for shard in todo:
        start, stop = bounds[shard]
        path, sidecar = output_dir / shard_name(shard), output_dir / sidecar_name(shard)
        sidecar.unlink(missing_ok=True)  # a stale sidecar must never vouch for the new file
        for stale in output_dir.glob(f".{path.name}.tmp-*"):
            stale.unlink(missing_ok=True)
        forward, backward = [], []
        for chunk in range(start, stop, args.batch_size):
            rows = dataset[chunk:min(stop, chunk + args.batch_size)]
            inputs = processor.preprocess_pairs(
                [image.convert("RGB") for image in rows[source_column]],
                [image.convert("RGB") for image in rows[target_column]],
            )
            for offset in range(len(rows[source_column])):
                generator = torch.Generator(device=accelerator.device)
                generator.manual_seed(_seed(args.seed, chunk + offset))
                grids_st, grids_ts = model.sample_hypotheses(
                    inputs["source_pixel_values"][offset:offset + 1].to(accelerator.device),
                    inputs["target_pixel_values"][offset:offset + 1].to(accelerator.device),
                    args.num_hypotheses, generator=generator,
                )
                forward.append(grids_st[:, 0].float().cpu())
                backward.append(grids_ts[:, 0].float().cpu())
                bar.update(1)
        tensors = {
            "hypotheses_src_to_trg": torch.stack(forward).contiguous(),
            "hypotheses_trg_to_src": torch.stack(backward).contiguous(),
            "pair_index": torch.arange(start, stop, dtype=torch.int64),
        }
        metadata = {
            "format": FORMAT, "format_version": str(FORMAT_VERSION), "num_hypotheses": str(args.num_hypotheses),
            "teacher": str(teacher), "teacher_sha256": str(config["teacher_sha256"]), "seed": str(args.seed),
            "shard": str(shard), "pair_start": str(start), "pair_stop": str(stop),
            "source_grid_size": json.dumps(list(tensors["hypotheses_src_to_trg"].shape[-2:])),
            "target_grid_size": json.dumps(list(tensors["hypotheses_trg_to_src"].shape[-2:])),
            "grid_units": "normalised [-1, 1], align_corners=False",
        }
        staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file(tensors, str(staging), metadata=metadata)
        with open(staging, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(staging, path)
        record = {"file": path.name, "shard": shard, "sha256": file_sha256(path), "size": path.stat().st_size,
                  "pair_start": start, "pair_stop": stop, "config": config}
        _atomic_write_text(sidecar, json.dumps(record, indent=2))
    bar.close()
    print(f"[generate_hypotheses] process {rank}: {len(todo)} shard(s) written, {skipped} already done", flush=True)
    accelerator.wait_for_everyone()

    index = None
    if accelerator.is_main_process:
        shards = []
        for shard, (start, stop) in enumerate(bounds):
            record = _read_json(output_dir / sidecar_name(shard))
            if record is None or record.get("config") != config:
                raise RuntimeError(f"shard {shard} has no valid sidecar after generation")
            shards.append({key: record[key] for key in ("file", "sha256", "size", "pair_start", "pair_stop")})
        index = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "num_pairs": num_pairs,
            "num_hypotheses": args.num_hypotheses, "config": config, "shards": shards,
            "pair_to_shard": [shard for shard, (start, stop) in enumerate(bounds) for _ in range(start, stop)],
        }
        _atomic_write_text(output_dir / INDEX_FILE, json.dumps(index, indent=2))
        accelerator.print(f"[generate_hypotheses] wrote {num_shards} shard(s) for {num_pairs} pairs to {output_dir}")
    accelerator.wait_for_everyone()
    return index


# -- reading ---------------------------------------------------------------------------------------
class HypothesisStore:
    """Read access to a finished hypotheses directory: ``store[i] -> (src_to_trg (n,2,h,w), trg_to_src)``.

    Every shard is checked against ``index.json`` (size and sha256) on open; a mismatch raises
    ``ValueError`` naming the shard. Shards are loaded lazily (the ``cache_shards`` newest are kept).
    """

    def __init__(self, output_dir, verify: bool = True, cache_shards: int = 4):
        self.output_dir = Path(output_dir)
        index = _read_json(self.output_dir / INDEX_FILE)
        if index is None:
            raise ValueError(f"{self.output_dir}: no readable {INDEX_FILE} (generation did not finish?)")
        if index.get("format") != FORMAT:
            raise ValueError(f"{self.output_dir / INDEX_FILE}: not a {FORMAT} index")
        self.index = index
        self.config = index["config"]
        self.num_hypotheses = int(index["num_hypotheses"])
        self._shards = index["shards"]
        self._pair_to_shard = index["pair_to_shard"]
        self._cache: OrderedDict[int, dict] = OrderedDict()
        self._cache_shards = max(1, cache_shards)
        if verify:
            self.verify()

    def verify(self) -> None:
        for record in self._shards:
            path = self.output_dir / record["file"]
            if not path.is_file():
                raise ValueError(f"hypotheses shard missing: {path}")
            size = path.stat().st_size
            if size != record["size"]:
                raise ValueError(f"corrupt hypotheses shard {path}: {size} bytes, index says {record['size']} (truncated?)")
            if file_sha256(path) != record["sha256"]:
                raise ValueError(f"corrupt hypotheses shard {path}: sha256 differs from {INDEX_FILE}")

    def __len__(self) -> int:
        return len(self._pair_to_shard)

    def _shard(self, shard: int) -> dict:
        if shard in self._cache:
            self._cache.move_to_end(shard)
            return self._cache[shard]
        from safetensors import SafetensorError
        from safetensors.torch import load

        # Read the bytes once, check them, decode them: no memory map of a file that a rerun could replace,
        # and what is checked is what is used.
        path = self.output_dir / self._shards[shard]["file"]
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != self._shards[shard]["sha256"]:
            raise ValueError(f"corrupt hypotheses shard {path}: sha256 differs from {INDEX_FILE}")
        try:
            tensors = load(data)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"corrupt hypotheses shard {path}: {error}") from error
        self._cache[shard] = tensors
        while len(self._cache) > self._cache_shards:
            self._cache.popitem(last=False)
        return tensors

    def __getitem__(self, pair_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(pair_index, int):
            raise TypeError(f"pair index must be an int, got {type(pair_index).__name__}")
        if pair_index < 0:
            pair_index += len(self)
        if not 0 <= pair_index < len(self):
            raise IndexError(f"pair {pair_index} out of range for {len(self)} pairs")
        shard = self._pair_to_shard[pair_index]
        tensors = self._shard(shard)
        row = pair_index - self._shards[shard]["pair_start"]
        if int(tensors["pair_index"][row]) != pair_index:
            raise ValueError(f"hypotheses shard {self._shards[shard]['file']} does not hold pair {pair_index} at row {row}")
        return tensors["hypotheses_src_to_trg"][row], tensors["hypotheses_trg_to_src"][row]


def load_hypotheses(output_dir, verify: bool = True) -> HypothesisStore:
    """Open a hypotheses directory written by this script (checksums verified unless ``verify=False``)."""
    return HypothesisStore(output_dir, verify=verify)


# -- CLI -------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    """Flags, over the values of ``--config`` (a YAML mapping of the same option names, ``_`` or ``-``)."""
    parser = argparse.ArgumentParser(prog="python -m semcorr.training.generate_hypotheses",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML file of these options (e.g. teacher: ..., num_hypotheses: 4); flags win")
    parser.add_argument("--teacher", help="a trained PMD teacher (save_pretrained directory); required")
    parser.add_argument("--pairs", help=f"{' | '.join(BENCHMARKS)} | path to a datasets directory with two Image columns; required")
    parser.add_argument("--data-dir", help="the extracted benchmark folder (benchmark --pairs)")
    parser.add_argument("--split", help="split (default: trn; test for pf-willow; train for a dataset directory)")
    parser.add_argument("--output-dir", help="where the shards and index.json go; required")
    parser.add_argument("--num-hypotheses", type=int, default=4)
    parser.add_argument("--shard-size", type=int, default=64, help="pairs per shard")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs read and preprocessed at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", help="datasets cache for the prepared benchmark (default: the HF cache)")
    parser.add_argument("--num-threads", type=int, help="torch.set_num_threads per process")
    args = parser.parse_args(argv)
    if args.config is not None:
        apply_config_file(parser, args, argv)
    for name in ("teacher", "pairs", "output_dir"):
        if getattr(args, name) is None:
            raise ValueError(f"--{name.replace('_', '-')} is required (a flag or a key of --config)")
    return args


def apply_config_file(parser: argparse.ArgumentParser, args: argparse.Namespace, argv) -> None:
    """Set the options of ``args.config`` that no flag gave; unknown keys and wrong types raise ValueError."""
    from semcorr.training.config import read_config_file

    raw, path = read_config_file(args.config)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of option names, got {type(raw).__name__}")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    given = {a.dest for a in parser._actions for flag in a.option_strings
             for arg in (argv if argv is not None else sys.argv[1:]) if arg == flag or arg.startswith(flag + "=")}
    for key, value in raw.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            raise ValueError(f"{path}: unknown option {key!r}; valid options: {', '.join(sorted(actions))}")
        wanted = actions[dest].type or str
        if value is not None and not (isinstance(value, wanted) and not isinstance(value, bool)):
            raise ValueError(f"{path}: option {key!r} must be {wanted.__name__}, got {value!r}")
        if dest not in given:
            setattr(args, dest, value)


def main(argv=None) -> int:
    threads = torch.get_num_threads()  # generate() may change it; callers in the same process keep theirs
    try:
        args = parse_args(argv)
        validate_args(args)
        generate(args)
    except ValueError as error:
        print(f"generate_hypotheses: error: {str(error).splitlines()[0] if str(error) else error!r}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
