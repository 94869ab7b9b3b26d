"""Accelerate training entry points.

* ``python -m semcorr.training.train_teacher --config X.yaml [--output-dir D] [--resume] [--max-steps N]``:
  the PMD probabilistic teacher on synthetic pairs (see :mod:`semcorr.training.train_teacher`);
  configs in ``training/configs/`` (``pmd_cpu_tiny.yaml``: minutes on a CPU; ``pmd_pf_pascal.yaml``:
  the published recipe).
* ``python -m semcorr.training.generate_hypotheses --teacher DIR --pairs pf-pascal --data-dir D --output-dir OUT``:
  the teacher's flow hypotheses on real pairs, in checksummed safetensors shards
  (:func:`semcorr.training.generate_hypotheses.load_hypotheses` reads them back).
* ``python -m semcorr.training.distill_student --hypotheses DIR --output-dir OUT``: the static
  student distilled with PSR weights and CAL (:mod:`semcorr.training.distill_student`).
* :mod:`semcorr.training.config`: the typed YAML config schema shared by the scripts.
* :mod:`semcorr.training.trainer`: the accelerator setup, step-loop pieces, checkpoints, metrics
  and ``final/`` writing shared by ``train_teacher`` and ``distill_student``.

Cascaded MIL, fine-tuning and labelling: planned, see the README table.
"""
