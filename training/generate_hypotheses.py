"""Sample PMD teacher flow hypotheses for real (unlabelled) image pairs, as checksummed shards.

Usage::

    python -m semcorr.training.generate_hypotheses --teacher runs/pmd-teacher-cpu-tiny/final \\
        --pairs pf-pascal --data-dir data/PF-PASCAL [--split trn] --output-dir hyps \\
        [--num-hypotheses 4] [--shard-size 64] [--batch-size 8] [--seed 0]
    python -m semcorr.training.generate_hypotheses --config pmd_pf_pascal_hypotheses.yaml   # the same as YAML
    torchrun --nproc_per_node 2 -m semcorr.training.generate_hypotheses ...      # 2 CPU processes
    accelerate launch [--multi_gpu --num_processes N] -m semcorr.training.generate_hypotheses ...

The config (:class:`HypothesesConfig`) has the sections ``data`` (``teacher``, ``pairs``,
``data_dir``, ``split``, ``cache_dir``), ``hypotheses`` (``num_hypotheses``) and ``run``
(:class:`~semcorr.training.config.InferenceRunConfig`: ``output_dir``, ``shard_size``,
``batch_size``, ``seed``, ``num_threads``, ``cpu``); flags override the file.

``--pairs`` is a benchmark name (``pf-pascal``, ``pf-willow``, ``spair-71k``; read from
``--data-dir``) or a ``datasets`` folder (``save_to_disk`` output, or any folder ``load_dataset``
reads) whose rows hold two Image columns (``source_image``/``target_image``, else the first two).

Output (``--output-dir``, a :class:`semcorr.utils.ShardStore` of format ``semcorr-pmd-hypotheses``)::

    shard-00000.safetensors   hypotheses_src_to_trg (P, n, 2, h_s, w_s), hypotheses_trg_to_src (P, n, 2, h_t, w_t),
                              pair_index (P,) int64; string metadata (num_hypotheses, teacher, grid sizes, ...)
    shard-00000.json          sidecar: sha256 and size of the shard, its pairs, the run's config
    index.json                every shard (file, sha256, size, pairs), pair -> shard map, config

Grids are in normalised units ``[-1, 1]`` (``align_corners=False``) at the teacher's feature
resolution; ``hypotheses_src_to_trg[p, l, :, y, x]`` is where source cell ``(x, y)`` of pair
``pair_index[p]`` (its row in the dataset split) lands in the target under hypothesis ``l``.

Determinism: pair ``i`` draws its gate noise from a generator seeded by ``(seed, i)`` and the
teacher runs in eval mode on that pair alone, so the hypotheses depend neither on ``--batch-size``
(how many pairs are read and preprocessed at once) nor on the number of processes. Crash safety and
the split over processes are those of :mod:`semcorr.training.inference`; :func:`semcorr.training.data.hypotheses.load_hypotheses`
reads them back, verifying every shard against ``index.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from semcorr.training.config import InferenceRunConfig, SectionedConfig
from semcorr.training.data.hypotheses import FORMAT, FORMAT_VERSION, load_teacher
from semcorr.training.data.pairs import image_columns, pair_split
from semcorr.training.inference import ShardedTask, run_sharded
from semcorr.training.seeding import generator_for
from semcorr.utils import sha256_file

FLAT_KEYS = {  # the flat option files of earlier versions -> the sectioned keys
    "teacher": "data.teacher", "pairs": "data.pairs", "data_dir": "data.data_dir", "split": "data.split",
    "cache_dir": "data.cache_dir", "num_hypotheses": "hypotheses.num_hypotheses", "output_dir": "run.output_dir",
    "shard_size": "run.shard_size", "batch_size": "run.batch_size", "seed": "run.seed", "num_threads": "run.num_threads",
}


# -- config ----------------------------------------------------------------------------------------------
@dataclass
class HypothesesDataConfig:
    """The teacher and the real pairs it labels.

    Attributes:
        teacher: a trained PMD teacher (``save_pretrained`` directory).
        pairs: a benchmark name (with ``data_dir``) or a ``datasets`` folder with two Image columns.
        data_dir: the extracted benchmark folder.
        split: the split (default: ``trn``; ``test`` for PF-WILLOW; ``train`` for a dataset folder).
        cache_dir: ``datasets`` cache for the prepared benchmark.
    """

    teacher: str | None = None
    pairs: str | None = None
    data_dir: str | None = None
    split: str | None = None
    cache_dir: str | None = None

    def validate(self) -> None:
        from semcorr.hub_datasets import BENCHMARKS

        for key in ("teacher", "pairs"):
            if getattr(self, key) is None:
                raise ValueError(f"data.{key} / --{key} is required (a flag or a key of --config)")
        teacher = Path(self.teacher).expanduser()
        if not teacher.is_dir():
            raise ValueError(f"data.teacher / --teacher: directory not found: {teacher}")
        if not (teacher / "config.json").is_file():
            raise ValueError(f"data.teacher / --teacher: {teacher} has no config.json (expected a save_pretrained directory)")
        if self.pairs in BENCHMARKS:
            if not self.data_dir:
                raise ValueError(f"--pairs {self.pairs} needs data.data_dir / --data-dir (the extracted benchmark folder)")
            if not Path(self.data_dir).expanduser().is_dir():
                raise ValueError(f"data.data_dir / --data-dir: directory not found: {Path(self.data_dir).expanduser()}")
        elif not Path(self.pairs).expanduser().exists():
            raise ValueError(f"data.pairs / --pairs: {self.pairs!r} is neither a benchmark ({', '.join(BENCHMARKS)}) "
                             "nor an existing dataset directory")

    def default_split(self) -> str:
        return pair_split(self.pairs, self.split)


@dataclass
class HypothesesSection:
    """Attributes: num_hypotheses: gate samples (flow hypotheses) per pair."""

    num_hypotheses: int = 4

    def validate(self) -> None:
        if self.num_hypotheses < 1:
            raise ValueError(f"hypotheses.num_hypotheses / --num-hypotheses must be >= 1, got {self.num_hypotheses}")


@dataclass
class HypothesesConfig(SectionedConfig):
    """``data``, ``hypotheses``, ``run`` (see the module docstring)."""

    data: HypothesesDataConfig = field(default_factory=HypothesesDataConfig)
    hypotheses: HypothesesSection = field(default_factory=HypothesesSection)
    run: InferenceRunConfig = field(default_factory=InferenceRunConfig)

    RENAMED = FLAT_KEYS

    def validate(self) -> None:
        if self.run.output_dir is None:
            raise ValueError("run.output_dir / --output-dir is required (a flag or a key of --config)")


# -- the task --------------------------------------------------------------------------------------------
class HypothesesTask(ShardedTask):
    """Teacher hypotheses of every pair, pair by pair (see the module docstring)."""

    name, format, what = "generate_hypotheses", FORMAT, "hypotheses"

    def setup(self, accelerator) -> None:
        from semcorr.hub_datasets import load_pairs

        data = self.config.data
        self.device = accelerator.device
        self.teacher_dir = Path(data.teacher).expanduser()
        self.model, self.processor = load_teacher(self.teacher_dir)
        self.model.to(self.device)
        with accelerator.main_process_first():  # one process prepares the benchmark's Arrow cache
            self.dataset = load_pairs(data.pairs, data.data_dir, split=data.default_split(), cache_dir=data.cache_dir)
        self.columns = image_columns(self.dataset)

    def num_pairs(self) -> int:
        return len(self.dataset)

    def job_config(self) -> dict:
        data, run = self.config.data, self.config.run
        weights = self.teacher_dir / "model.safetensors"
        return {"teacher": str(self.teacher_dir), "teacher_sha256": sha256_file(weights) if weights.is_file() else None,
                "pairs": data.pairs, "data_dir": data.data_dir, "split": data.split, "num_pairs": self.num_pairs(),
                "num_hypotheses": self.config.hypotheses.num_hypotheses, "shard_size": run.shard_size,
                "seed": run.seed, "image_size": list(self.model.config.image_size)}

    def index_extra(self) -> dict:
        return {"num_hypotheses": self.config.hypotheses.num_hypotheses}

    def compute_shard(self, start: int, stop: int, progress) -> bytes:
        from safetensors.torch import save

        forward, backward = [], []
        for chunk in range(start, stop, self.config.run.batch_size):
            rows = self.dataset[chunk:min(stop, chunk + self.config.run.batch_size)]
            inputs = self.processor.preprocess_pairs(rows[self.columns[0]], rows[self.columns[1]])
            for offset in range(len(rows[self.columns[0]])):
                grids_st, grids_ts = self._sample(inputs, offset, chunk + offset)
                forward.append(grids_st)
                backward.append(grids_ts)
                progress.update(1)
        tensors = {"hypotheses_src_to_trg": torch.stack(forward).contiguous(),
                   "hypotheses_trg_to_src": torch.stack(backward).contiguous(),
                   "pair_index": torch.arange(start, stop, dtype=torch.int64)}
        return save(tensors, metadata=self._metadata(tensors, start, stop))

    def _sample(self, inputs, offset: int, pair_index: int):
        """``(n, 2, h_s, w_s)`` and ``(n, 2, h_t, w_t)`` hypotheses of one pair, noise seeded by ``(seed, pair)``."""
        generator = generator_for(self.config.run.seed, pair_index, device=self.device)
        grids_st, grids_ts = self.model.sample_hypotheses(
            inputs["source_pixel_values"][offset:offset + 1].to(self.device),
            inputs["target_pixel_values"][offset:offset + 1].to(self.device),
            self.config.hypotheses.num_hypotheses, generator=generator)
        return grids_st[:, 0].float().cpu(), grids_ts[:, 0].float().cpu()

    def _metadata(self, tensors: dict, start: int, stop: int) -> dict[str, str]:
        job = self.job_config()
        return {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                "num_hypotheses": str(self.config.hypotheses.num_hypotheses), "teacher": job["teacher"],
                "teacher_sha256": str(job["teacher_sha256"]), "seed": str(self.config.run.seed),
                "shard": str(start // self.config.run.shard_size), "pair_start": str(start), "pair_stop": str(stop),
                "source_grid_size": json.dumps(list(tensors["hypotheses_src_to_trg"].shape[-2:])),
                "target_grid_size": json.dumps(list(tensors["hypotheses_trg_to_src"].shape[-2:])),
                "grid_units": "normalised [-1, 1], align_corners=False"}


# -- CLI -------------------------------------------------------------------------------------------------
FLAGS = {"teacher": "data.teacher", "pairs": "data.pairs", "data_dir": "data.data_dir", "split": "data.split",
         "cache_dir": "data.cache_dir", "num_hypotheses": "hypotheses.num_hypotheses", "output_dir": "run.output_dir",
         "shard_size": "run.shard_size", "batch_size": "run.batch_size", "seed": "run.seed",
         "num_threads": "run.num_threads"}


def parse_args(argv=None) -> argparse.Namespace:
    from semcorr.training.cli import add_common_arguments

    parser = argparse.ArgumentParser(prog="python -m semcorr.training.generate_hypotheses",
                                     description=__doc__.split("\n")[0])
    add_common_arguments(parser, training=False)
    parser.add_argument("--teacher", help="a trained PMD teacher (save_pretrained directory); required")
    parser.add_argument("--pairs", help="pf-pascal | pf-willow | spair-71k | a datasets directory with two Image columns")
    parser.add_argument("--data-dir", help="the extracted benchmark folder (benchmark --pairs)")
    parser.add_argument("--split", help="split (default: trn; test for pf-willow; train for a dataset directory)")
    parser.add_argument("--output-dir", help="where the shards and index.json go; required")
    parser.add_argument("--num-hypotheses", type=int, help="hypotheses per pair (default 4)")
    parser.add_argument("--shard-size", type=int, help="pairs per shard (default 64)")
    parser.add_argument("--batch-size", type=int, help="pairs read and preprocessed at once (default 8)")
    parser.add_argument("--seed", type=int, help="default 0")
    parser.add_argument("--cache-dir", help="datasets cache for the prepared benchmark (default: the HF cache)")
    parser.add_argument("--num-threads", type=int, help="torch.set_num_threads per process")
    return parser.parse_args(argv)


def load_config(args: argparse.Namespace) -> HypothesesConfig:
    from semcorr.training.cli import overrides_of

    return HypothesesConfig.load(args.config, overrides_of(args, FLAGS))


def main(argv=None) -> int:
    try:
        run_sharded(HypothesesTask(load_config(parse_args(argv))))
    except ValueError as error:
        print(f"generate_hypotheses: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
