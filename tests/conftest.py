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


SUBPROCESS_TIMEOUT_S = 600
"""Default limit of one CLI subprocess in a test: well under pytest's global timeout (1800 s in
pyproject.toml), so a hung command fails its test with a message instead of killing the session."""


def run_cli(args: list[str], cwd: Path, env: dict | None = None,
            timeout: float = SUBPROCESS_TIMEOUT_S) -> subprocess.CompletedProcess:
    """run_linrep in a session of its own: on a timeout the whole process group (the CLI and the
    Ray processes it started) is SIGKILLed before the test fails, so nothing is left running."""
    import signal

    full_env = {**os.environ, **(env or {})}
    proc = subprocess.Popen([*LINREP, *args], cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"linrep {' '.join(args)} ran past {timeout:.0f} s; its process group was killed\n"
                    f"{(err or '')[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
