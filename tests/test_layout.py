"""Repository layout rules that a broken install or an upward import would otherwise show only at run time."""
from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "src" / "kat_kernels"


def _imports(path: Path) -> set[str]:
    """Top-level module names that ``path`` imports (absolute imports only; relative ones stay in the package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_folder_at_the_root_shadows_an_installed_distribution():
    """``python -m kat.train`` / ``python -m pytest`` from the root put the root on sys.path: a package folder there
    (e.g. the old top-level ``kernels/``) hides the installed distribution of that name (transformers imports the
    ``kernels`` distribution), and ``import transformers``' model classes fail on a fresh clone."""
    installed = set(importlib.metadata.packages_distributions())
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert not packages & installed, sorted(packages & installed)


def test_transformers_models_import_from_the_repository_root():
    code = "from transformers import Qwen2Config, Qwen2ForCausalLM; Qwen2ForCausalLM(Qwen2Config(vocab_size=8, " \
           "hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_kernels_import_only_torch_and_triton():
    allowed = {"torch", "triton", "kat_kernels", "__future__"} | set(sys.stdlib_module_names)
    for path in sorted(KERNELS.rglob("*.py")):
        bad = _imports(path) - allowed
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}: kat_kernels may import only torch and triton"


# The floors (docs/design.md): imports only go down. Entry points → stages (LightningModules) and trainer plumbing
# → the libraries (losses, rewards, rollout, data, models, tracking, rl, …) → kat_kernels.
ENTRY = {"train", "pipeline", "eval", "generate", "chat", "synth", "teacher_cache", "upscale", "sweep"}
TRAINING = {"stages", "trainer"}


def _floor(top: str) -> int:
    return 2 if top in ENTRY else 1 if top in TRAINING else 0


def test_imports_only_go_down():
    src = ROOT / "src" / "kat"
    bad = []
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src)
        top = rel.parts[0].removesuffix(".py")
        if top == "__init__":
            continue
        for name in _all_kat_imports(path):
            parts = name.split(".")
            if parts[0] == "kat_kernels":
                if top == "losses":
                    bad.append(f"{rel} imports {name}: the torch references never import the kernels")
                continue
            if parts[0] != "kat" or len(parts) < 2:
                continue
            if _floor(parts[1]) > _floor(top):
                bad.append(f"{rel} imports {name} (a higher floor)")
    assert not bad, "\n".join(bad)


def _all_kat_imports(path: Path) -> set[str]:
    """Full dotted names of the kat / kat_kernels modules ``path`` imports, at any depth of the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in out if n.split(".")[0] in ("kat", "kat_kernels")}
