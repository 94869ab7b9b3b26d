"""The one training loop with a task that is not PMD: a tiny linear regression.

It shows what a new task has to write (model, items, the loss of a step, optional state) and checks
the loop's promises for any task: it learns, resumes bit-identically (with the task's own state),
stops on a non-finite loss naming the step, takes optimiser and schedule from the config, and the
one config format (``--set``, renamed keys, unknown keys, wrong types).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from semcorr.training.checkpoints import checkpoint_steps
from semcorr.training.config import TrainingConfig
from semcorr.training.loop import NonFiniteLossError, StepOutput, Trainer, TrainingTask

NUM_POINTS = 16


class ToyConfig(PretrainedConfig):
    model_type = "semcorr-test-toy-regression"

    def __init__(self, width: int = 3, **kwargs):
        self.width = width
        super().__init__(**kwargs)


class ToyModel(PreTrainedModel):
    config_class = ToyConfig
    base_model_prefix = "toy"

    def __init__(self, config):
        super().__init__(config)
        self.linear = nn.Linear(config.width, 1)
        self.post_init()

    def forward(self, inputs):
        return self.linear(inputs)[:, 0]


@dataclass
class ToyData:
    noise: float = 0.0
    nan_at_step: int | None = None


@dataclass
class ToyRunConfig(TrainingConfig):  # a task's config: its data section, the shared model / optim / run
    data: ToyData = field(default_factory=ToyData)

    MODEL_CONFIG = ToyConfig
    RENAMED = {"optim.learning_rate": "optim.lr"}


class ToyTask(TrainingTask):
    """y = x . (1, -2, 3) + 0.5 on 16 fixed points; counts how often each point was used (task state)."""

    name = "toy"

    def setup(self, accelerator):
        generator = torch.Generator().manual_seed(0)
        self.inputs = torch.randn(NUM_POINTS, 3, generator=generator)
        self.targets = self.inputs @ torch.tensor([1.0, -2.0, 3.0]) + 0.5
        self.visits = torch.zeros(NUM_POINTS)
        self.epochs_ended = []

    def build_model(self):
        torch.manual_seed(self.config.optim.seed)
        return ToyModel(ToyConfig(**self.config.model))

    def num_items(self):
        return NUM_POINTS

    def step(self, model, context):
        items = torch.tensor(context.items)[context.piece]
        loss = ((model(self.inputs[items]) - self.targets[items]) ** 2).mean()
        if self.config.data.nan_at_step == context.global_step + 1:
            loss = loss * float("nan")
        self.visits[items] += 1
        return StepOutput(loss, {"mse": loss.detach()})

    def end_of_epoch(self, epoch):
        self.epochs_ended.append(epoch)

    def save_state(self, folder):
        from safetensors.torch import save_file

        save_file({"visits": self.visits}, str(Path(folder) / "toy_state.safetensors"))

    def load_state(self, folder):
        self.visits = load_file(str(Path(folder) / "toy_state.safetensors"))["visits"]


def toy_config(tmp_path, name="out", **overrides):
    values = {"optim.lr": 0.05, "optim.batch_size": 4, "optim.epochs": 5, "optim.lr_milestones": [],
              "run.output_dir": str(tmp_path / name), "run.save_every_steps": 3, "run.log_with": [],
              "run.num_threads": 1, **overrides}
    return ToyRunConfig.load(None, values)


def step_records(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
            if '"train/loss"' in line]


def test_a_new_task_learns_through_the_loop(tmp_path):
    task = ToyTask(toy_config(tmp_path, **{"optim.optimizer": "sgd", "optim.lr": 0.3, "optim.momentum": 0.0}))
    metrics = Trainer(task).run()
    assert metrics["steps"] == 20 and metrics["epochs_completed"] == 5.0  # 16 points / batch 4 = 4 steps per epoch
    losses = [r["train/loss"] for r in step_records(tmp_path / "out")]
    assert sum(losses[-4:]) / 4 < 0.1 * sum(losses[:4]) / 4, losses  # measured: 0.067 vs 3.57
    assert task.epochs_ended == [0, 1, 2, 3, 4]
    assert torch.equal(task.visits, torch.full((NUM_POINTS,), 5.0))  # every point once per epoch
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "final" / "toy_state.safetensors").is_file()
    assert not (tmp_path / "out" / "final" / "preprocessor_config.json").exists()  # not an image model


def test_resume_is_bit_identical_with_the_task_state(tmp_path):
    Trainer(ToyTask(toy_config(tmp_path, "full"))).run()
    Trainer(ToyTask(toy_config(tmp_path, "cut")), max_steps=7).run()  # checkpoints at 3, 6, and 7 (the end)
    assert checkpoint_steps(tmp_path / "cut") == [3, 6, 7]
    resumed = ToyTask(toy_config(tmp_path, "cut"))
    Trainer(resumed, resume=True).run()
    assert resumed.epochs_ended == [1, 2, 3, 4]  # epoch 0 ended before the cut, and only once
    full, cut = load_file(tmp_path / "full/final/model.safetensors"), load_file(tmp_path / "cut/final/model.safetensors")
    for name in full:
        assert torch.equal(full[name], cut[name]), name
    assert torch.equal(load_file(tmp_path / "cut/final/toy_state.safetensors")["visits"], torch.full((NUM_POINTS,), 5.0))
    assert [r["train/loss"] for r in step_records(tmp_path / "full")][7:] == \
        [r["train/loss"] for r in step_records(tmp_path / "cut")][7:]


def test_non_finite_loss_stops_naming_the_step_and_the_last_checkpoint(tmp_path):
    config = toy_config(tmp_path, **{"data.nan_at_step": 5})
    with pytest.raises(NonFiniteLossError, match=r"step 5 \(epoch 2.*step-3"):
        Trainer(ToyTask(config)).run()
    assert checkpoint_steps(tmp_path / "out") == [3]
    assert not (tmp_path / "out" / "final").exists()


@pytest.mark.parametrize("settings, expected", [
    ({"optim.scheduler": "multistep", "optim.lr_milestones": [1, 3], "optim.lr_gamma": 0.5},
     lambda step: 0.05 * 0.5 ** ((step >= 4) + (step >= 12))),
    ({"optim.scheduler": "step", "optim.lr_step_epochs": 2, "optim.lr_gamma": 0.1},
     lambda step: 0.05 * 0.1 ** (step // 8)),
    ({"optim.scheduler": "cosine", "optim.min_lr": 0.01},
     lambda step: 0.01 + (0.05 - 0.01) * (1 + math.cos(math.pi * step / 20)) / 2),
    ({"optim.scheduler": "constant"}, lambda step: 0.05),
    ({"optim.scheduler": "constant", "optim.warmup_steps": 4}, lambda step: 0.05 * min(1.0, (step + 1) / 5)),
])
def test_schedule_comes_from_the_config(tmp_path, settings, expected):
    Trainer(ToyTask(toy_config(tmp_path, **settings))).run()
    # the record of step s (1-based) holds the lr after s scheduler steps
    for record in step_records(tmp_path / "out"):
        assert record["lr"] == pytest.approx(expected(record["step"]), rel=1e-6, abs=1e-9), (record["step"], settings)


@pytest.mark.parametrize("name, optimizer_class, extra", [
    ("adam", torch.optim.Adam, {}), ("adamw", torch.optim.AdamW, {"optim.weight_decay": 0.01}),
    ("sgd", torch.optim.SGD, {"optim.momentum": 0.8, "optim.nesterov": True}),
])
def test_optimizer_comes_from_the_config(tmp_path, name, optimizer_class, extra):
    trainer = Trainer(ToyTask(toy_config(tmp_path, **{"optim.optimizer": name, "optim.epochs": 1, **extra})))
    trainer.run()
    optimizer = trainer.optimizer.optimizer  # accelerate's wrapper
    assert type(optimizer) is optimizer_class
    if name == "sgd":
        assert optimizer.defaults["momentum"] == 0.8 and optimizer.defaults["nesterov"] is True


def test_the_config_format(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text("optim:\n  lr: 0.1\n  batch_size: 4\nrun:\n  output_dir: out\n")
    config = ToyRunConfig.load(path, ["optim.lr=1e-4", "optim.lr_milestones=[2, 3]", "run.cpu=true", "model.width=5"])
    assert config.optim.lr == 1e-4 and config.optim.lr_milestones == [2, 3] and config.run.cpu is True
    assert config.model == {"width": 5} and config.optim.batch_size == 4 and config.source == str(path)
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ValueError, match="config key 'optim.learning_rate' is now 'optim.lr'"):
        ToyRunConfig.load(path)
    with pytest.raises(ValueError, match=r"unknown key\(s\) optim\.lrr; valid keys of 'optim': .*\blr\b"):
        ToyRunConfig.load(None, {"optim.lrr": 1})
    with pytest.raises(ValueError, match=r"optim\.epochs must be int, got '3'"):
        ToyRunConfig.load(None, ["optim.epochs='3'"])
    with pytest.raises(ValueError, match=r"optim\.scheduler must be one of constant, step, multistep, cosine"):
        ToyRunConfig.load(None, {"optim.scheduler": "linear"})
    with pytest.raises(ValueError, match=r"unknown section\(s\) optimizer; valid sections: model, data, optim, run"):
        ToyRunConfig.from_dict({"optimizer": {}})
    with pytest.raises(ValueError, match="expected section.key=value"):
        ToyRunConfig.load(None, ["lr=1"])
