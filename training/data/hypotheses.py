"""PMD teacher hypotheses on disk: the teacher that makes them and the checksummed store that holds them.

Written by :mod:`semcorr.training.generate_hypotheses` (a :class:`semcorr.utils.ShardStore` of format
``semcorr-pmd-hypotheses``), read by :mod:`semcorr.training.distill_student`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from semcorr.utils import ShardStore

FORMAT = "semcorr-pmd-hypotheses"
FORMAT_VERSION = 1


def load_teacher(teacher: Path, label: str = "--teacher"):
    """The PMD teacher saved in ``teacher`` (eval mode); ``ValueError`` starting with ``label`` otherwise."""
    from semcorr.modeling import load_matcher

    try:
        model, processor, _ = load_matcher(str(teacher), device="cpu")
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{label}: cannot load a model from {teacher}: {error}") from error
    if not hasattr(model, "sample_hypotheses"):
        raise ValueError(f"{label}: {teacher} holds a {type(model).__name__}, not a PMD teacher (no sample_hypotheses)")
    return model.eval(), processor


class HypothesisStore:
    """A finished hypotheses directory: ``store[i] -> (src_to_trg (n, 2, h, w), trg_to_src (n, 2, h_t, w_t))``.

    Every shard is checked against ``index.json`` on open (``verify``) and on every read; a mismatch
    raises ``ValueError`` naming the shard. Shards are decoded lazily (the 4 most recent are kept).
    """

    def __init__(self, output_dir, verify: bool = True):
        self.reader = ShardStore.open(output_dir, FORMAT, verify=verify, what="hypotheses")
        self.output_dir, self.index, self.config = self.reader.root, self.reader.index, self.reader.config
        self.num_hypotheses = int(self.index["num_hypotheses"])

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, pair_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from safetensors.torch import load

        shard, row = self.reader.locate(pair_index)
        tensors = self.reader.decoded(shard, load)
        if int(tensors["pair_index"][row]) != row + self.reader.shards[shard]["pair_start"]:
            raise ValueError(f"hypotheses shard {self.reader.shards[shard]['file']} does not hold pair {pair_index} "
                             f"at row {row}")
        return tensors["hypotheses_src_to_trg"][row], tensors["hypotheses_trg_to_src"][row]


def load_hypotheses(output_dir, verify: bool = True) -> HypothesisStore:
    """Open a hypotheses directory written by this script (checksums verified unless ``verify=False``)."""
    return HypothesisStore(output_dir, verify=verify)
