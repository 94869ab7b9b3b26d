"""PMD student distillation under two CPU processes (torchrun): one writer, the same global batches,
the PSR prior gathered from both processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from semcorr.training import distill_student as ds
from tests.test_distill_student import records, run, setup  # noqa: F401  (fixtures)


def test_two_cpu_processes_match_one(setup, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert run(setup, one, "--batch-size", 4, "--epochs", 2, "--save-every-steps", 1) == 0
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1",
                   "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
         "-m", "semcorr.training.distill_student", "--config", str(setup["yaml"]), "--hypotheses", str(setup["hyps"]),
         "--cache-dir", str(setup["cache"]), "--output-dir", str(two), "--batch-size", "4", "--seed", "3",
         "--epochs", "2", "--save-every-steps", "1"],
        capture_output=True, text=True, env=environment, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    steps_one = [r for r in records(one) if "train/loss" in r]
    steps_two = [r for r in records(two) if "train/loss" in r]
    assert [r["step"] for r in steps_two] == [1, 2]  # one writer, not one per process
    assert all(r["world_size"] == 2 for r in steps_two)
    # the same global batches and flips, split over the processes
    assert [(r["pairs"], r["flips"]) for r in steps_two] == [(r["pairs"], r["flips"]) for r in steps_one]
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert len(list((two / "checkpoints" / "step-2").glob("model*.safetensors"))) == 1  # one writer
    state_one, state_two = load_file(str(one / "final" / ds.PSR_FILE)), load_file(str(two / "final" / ds.PSR_FILE))
    # every pair of both processes' slices reached the PSR state once per epoch
    assert torch.equal(state_two["last_epoch_count"], torch.ones(4))
    assert torch.equal(state_two["last_epoch_count"], state_one["last_epoch_count"])
    # Same weights at step 1; the student's batch norm sees 2 pairs per process instead of 4, so the
    # empirical variance (and with it the prior) agrees only approximately.
    assert steps_two[0]["train/distillation"] == pytest.approx(steps_one[0]["train/distillation"], rel=0.3)
    torch.testing.assert_close(state_two["psr_prior"], state_one["psr_prior"], rtol=0, atol=2e-3)
    assert len(list((two / "final").glob("model*.safetensors"))) == 1
