"""Training and sharded inference: one loop, tasks that supply their data and step, one config format.

Entry points (``python -m`` them, or ``accelerate launch -m`` / ``torchrun -m`` on many processes):

* ``semcorr.training.train_teacher`` -- the PMD probabilistic teacher on synthetic warps.
* ``semcorr.training.generate_hypotheses`` -- the teacher's flow hypotheses on real pairs (sharded inference).
* ``semcorr.training.distill_student`` -- the static PMD student, distilled with PSR weights and CAL.
* ``semcorr.training.cpu_chain`` -- the whole PMD chain on a CPU, end to end.

The machinery:

* :mod:`.loop` -- :class:`~semcorr.training.loop.Trainer`, the one training loop (accelerator,
  optimiser and schedule, steps, progress, trackers, NaN stop, checkpoints, resume, ``final/``),
  and :class:`~semcorr.training.loop.TrainingTask`, what a task supplies (model, data, the loss of
  a step, extra state, end-of-epoch updates, a model card).
* :mod:`.inference` -- :func:`~semcorr.training.inference.run_sharded`, the one loop of per-pair
  inference jobs over a checksummed shard store, and :class:`~semcorr.training.inference.ShardedTask`.
* :mod:`.config` -- the one config format (sectioned YAML, typed, ``--set section.key=value``).
* :mod:`.optim`, :mod:`.checkpoints`, :mod:`.tracking`, :mod:`.seeding`, :mod:`.cli` -- the loop's parts.
* :mod:`.data` -- synthetic warps, unlabelled image sources, labelled keypoint batches.

A new training task is a module with a config dataclass, a :class:`TrainingTask` subclass and a
``main`` that calls :func:`~semcorr.training.loop.run_command`; ``configs/`` holds the shipped YAML files.
"""
