"""The RL algorithm without Lightning (the LightningModule that drives it: :mod:`kat.stages.rl`).

One RL step, module by module (docs/rl.md; the maths: docs/algorithms.md):

* :mod:`kat.rl.sampling` — which prompts a step trains on (SRPO History Resampling, DAPO dynamic sampling,
  AdaptThink's forced modes) and :func:`~kat.rl.sampling.collect`, the rollout -> grade -> credit loop;
* :mod:`kat.rl.shaping` — reward shaping: each estimator's per-rollout / per-group reward rules;
* :mod:`kat.rl.credit` — credit assignment: one ``*_credit`` function and settings dataclass per estimator,
  the registry :data:`~kat.rl.credit.ALGORITHMS` (``algorithm=`` names) and :func:`~kat.rl.credit.assign_credit`;
* :mod:`kat.rl.update` — the policy update over micro-batches (the loss maths itself: :mod:`kat.losses.grpo`);
* :mod:`kat.rl.metrics` — the ``rl/*`` metrics of a step.
"""
