"""The layering, checked by real tools: import-linter's contracts (pyproject.toml) and an AST scan.

- `lint-imports`: the floors (linrep -> tune -> probes -> trainer), only trainer.tracking imports
  mlflow, only trainer.engine imports deepspeed (function-level imports included).
- No module uses a private name (leading underscore) of another project module, whether imported
  (`from trainer.tracking import _client`) or reached as an attribute (`tracking._client(...)`).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("linrep", "tune", "probes", "trainer")


def _lint_imports() -> str:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports is not installed: `make test` installs the [test] extra (import-linter)")
    return exe


def test_import_contracts_are_kept(tmp_path):
    proc = subprocess.run([_lint_imports(), "--no-logo", "--no-cache"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "3 kept, 0 broken" in proc.stdout


def test_import_contracts_catch_a_violation(tmp_path):
    """The contracts are live: a copy of the tree with one upward import breaks the floors."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "trainer" / "errors.py", "a") as f:
        f.write("\n\ndef _upward():\n    import mlflow  # noqa: F401\n    from tune import sweep  # noqa: F401\n")
    proc = subprocess.run([_lint_imports(), "--no-logo", "--no-cache"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={"PATH": str(Path(sys.executable).parent),
                                                       "PYTHONPATH": str(tmp_path)})
    assert proc.returncode != 0
    assert "trainer.errors -> tune.sweep" in proc.stdout
    assert "trainer.errors -> mlflow" in proc.stdout


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(path: Path, modules: dict[str, Path]) -> list[str]:
    """`file:line: name` for each private name of another project module used in `path`."""
    me = _module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases: dict[str, str] = {}   # local name -> project module it is bound to
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in modules:
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                if f"{node.module}.{a.name}" in modules:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                elif node.module in modules and node.module != me and _is_private(a.name):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}.{a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _is_private(node.attr):
            module = aliases.get(node.value.id)
            if module and module != me:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {module}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    modules = _project_modules()
    found = [hit for path in sorted(modules.values()) for hit in private_uses(path, modules)]
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_private_name_scan_catches_both_forms(tmp_path, monkeypatch):
    probe = ROOT / "probes" / "_layers_probe_tmp.py"
    probe.write_text("from trainer import tracking\nfrom trainer.tracking import _client\n\n"
                     "def f():\n    return tracking._client\n")
    try:
        hits = private_uses(probe, _project_modules())
    finally:
        probe.unlink()
    assert [h.split(": ")[1] for h in hits] == ["trainer.tracking._client", "trainer.tracking._client"]
