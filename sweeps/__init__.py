"""kat's ready-made Hydra sweeps (a config root on Hydra's search path, see ``hydra.searchpath`` in conf/train.yaml).

Groups: ``sweep/`` (``+sweep=NAME``: the swept parameters of one experiment) and ``hydra/launcher/``
(``hydra/launcher=slurm``). Installed as the data package ``kat.sweeps``; in a clone it is read from
``./sweeps`` when you run from the project root.
"""
