"""The RL stage's former module name: the LightningModule is :class:`kat.stages.rl.RL`."""
from kat.stages.rl import RL, StepSRPO  # noqa: F401
