"""Trainer plumbing shared by the stages, kept out of the LightningModules: the FSDP2 strategy and atomic
checkpoint IO (:mod:`kat.trainer.fsdp`), kat's callbacks (:mod:`kat.trainer.callbacks`), the progress display
(:mod:`kat.trainer.progress`) and rank/RNG helpers (:mod:`kat.trainer.distributed`)."""
