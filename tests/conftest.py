"""Shared fixtures: a real local Ray, a real sqlite MLflow store, the repo's shared fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
LINREP = [sys.executable, "-m", "linrep"]

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("PYTHONUNBUFFERED", "1")


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray runtime with this machine's 2 CPUs (module-scoped: started once per file)."""
    import ray

    from trainer.ray_private import use_single_machine_mode

    if not ray.is_initialized():
        use_single_machine_mode()  # as a local `linrep train`: every socket on 127.0.0.1
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
                 configure_logging=True, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.fixture
def sqlite_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def run_linrep(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (its own Ray, its own stores under cwd)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*LINREP, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
