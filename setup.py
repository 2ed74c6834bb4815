"""Package layout for setuptools (metadata lives in pyproject.toml).

One distribution, two import packages: ``kat`` (src/kat) and ``kat_kernels`` (src/kat_kernels/). The Hydra
config tree ``conf/`` is shipped inside ``kat`` as the data package ``kat.conf`` so that a
non-editable install (the GPU machine) finds it too; the ready-made sweeps (``sweeps/``) likewise ship
as ``kat.sweeps`` (found by Hydra through ``pkg://kat.sweeps``).
"""
from setuptools import find_packages, setup


def _tree(root: str, name: str) -> list[str]:
    return [name] + [f"{name}.{p}" for p in find_packages(root)]


setup(
    packages=_tree("src/kat", "kat") + _tree("src/kat_kernels", "kat_kernels") + ["kat.conf", "kat.sweeps"],
    package_dir={"kat": "src/kat", "kat_kernels": "src/kat_kernels", "kat.conf": "conf", "kat.sweeps": "sweeps"},
    package_data={"kat.conf": ["*.yaml", "*/*.yaml", "*/*/*.yaml"],
                  "kat.sweeps": ["*.yaml", "*/*.yaml", "*/*/*.yaml"]},
    include_package_data=False,
)
