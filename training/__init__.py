"""Accelerate training entry points.

* ``python -m semcorr.training.train_teacher --config X.yaml [--output-dir D] [--resume] [--max-steps N]``:
  the PMD probabilistic teacher on synthetic pairs (see :mod:`semcorr.training.train_teacher`);
  configs in ``training/configs/`` (``pmd_cpu_tiny.yaml``: minutes on a CPU; ``pmd_pf_pascal.yaml``:
  the published recipe).
* :mod:`semcorr.training.config`: the typed YAML config schema shared by the scripts.

Student distillation, cascaded MIL, fine-tuning and labelling: planned, see the README table.
"""
