"""The one loop of sharded inference jobs: a task labels pairs, the loop splits, stores and resumes.

Jobs that compute something per image pair with a trained model (PMD teacher hypotheses, SC-ImageNet
pseudo labels) run here. The pairs are cut into shards of ``run.shard_size``; process ``r`` of
``W`` computes the shards ``k`` with ``k % W == r`` and writes each through
:class:`semcorr.utils.ShardStore` (atomic, checksummed, with a sidecar), so a killed job rerun with
the same config skips the finished shards and recomputes the rest -- no pair lost, none twice. The
main process writes ``index.json`` once every shard is there. A task seeds every random draw from
``(run.seed, pair index)``, so the output does not depend on the number of processes nor on
``run.batch_size``.

A task (:class:`ShardedTask`) supplies: ``setup`` (load its model and pairs), ``num_pairs``,
``job_config`` (everything the output depends on: a rerun with another one is refused),
``compute_shard(start, stop, progress)`` (the payload bytes of pairs ``[start, stop)``) and,
optionally, extra keys of the index.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from semcorr.utils import ShardStore

from .tracking import make_accelerator, progress_bar, torch_threads


class ShardedTask(ABC):
    """A per-pair inference job for :func:`run_sharded` (``config.run`` is an ``InferenceRunConfig``).

    Class attributes: ``name`` (log prefix), ``format`` (the store's format name), ``suffix``
    (payload file extension), ``what`` (how messages call the output, e.g. ``"hypotheses"``).
    """

    name = "inference"
    format = "semcorr-shards"
    suffix = ".safetensors"
    what = "the output"

    def __init__(self, config):
        self.config = config

    @abstractmethod
    def setup(self, accelerator) -> None:
        """Load the model and the pairs (``accelerator.main_process_first()`` around dataset preparation)."""

    @abstractmethod
    def num_pairs(self) -> int:
        """How many pairs the job covers."""

    @abstractmethod
    def job_config(self) -> dict:
        """Everything the output depends on (JSON-serialisable), recorded in every sidecar and the index."""

    @abstractmethod
    def compute_shard(self, start: int, stop: int, progress) -> bytes:
        """The payload of pairs ``[start, stop)``; call ``progress.update(n)`` as pairs are done."""

    def index_extra(self) -> dict:
        """Extra top-level keys of ``index.json``."""
        return {}


def run_sharded(task: ShardedTask) -> dict | None:
    """Run (or continue) a sharded job; returns the index on the main process, None elsewhere.

    Raises:
        ValueError: the output directory holds the output of a run with another config.
    """
    run = task.config.run
    with torch_threads(run.num_threads):
        accelerator = make_accelerator(run.cpu)
        world, rank = accelerator.num_processes, accelerator.process_index
        task.setup(accelerator)
        if task.num_pairs() == 0:
            raise ValueError(f"{task.name}: there are no pairs to process")
        store = ShardStore(run.output_dir, task.format, task.job_config(), task.num_pairs(), run.shard_size,
                           suffix=task.suffix, what=task.what)
        store.check_reusable()  # on every process, so all of them stop
        if accelerator.is_main_process:
            store.root.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        mine = store.shards_of(rank, world)
        todo = store.pending(mine)
        bar = progress_bar(accelerator, sum(store.bounds(k)[1] - store.bounds(k)[0] for k in todo), task.what,
                           unit="pair", leave=True)
        for shard in todo:
            store.write(shard, task.compute_shard(*store.bounds(shard), bar))
        bar.close()
        print(f"[{task.name}] process {rank}: {len(todo)} shard(s) written, {len(mine) - len(todo)} already done",
              flush=True)
        accelerator.wait_for_everyone()
        index = None
        if accelerator.is_main_process:
            index = store.write_index(**task.index_extra())
            accelerator.print(f"[{task.name}] wrote {store.num_shards} shard(s) for {store.num_pairs} pairs to "
                              f"{store.root}")
        accelerator.wait_for_everyone()
        return index
