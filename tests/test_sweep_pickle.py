"""A sweep folder is shared storage (a volume, a bucket): a crafted pickle there must never run.

Ray Tune's `Tuner.restore` unpickles tuner.pkl and the experiment state from the experiment
folder; linrep never calls it. A first run and a resume are both built from linrep's own JSON
ledger, so pickles planted in the sweep folder (before the first run, and again before a resume)
are never loaded: the marker file their payload would create must not appear.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import yaml

from tests.conftest import run_cli

MARKER = "sweep-pickle-ran"


class Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_pickles(sweep_dir: Path, marker: Path) -> None:
    """What Tune's restore would read: tuner.pkl, trainable.pkl and an experiment state file."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    payload = pickle.dumps(Exploit(marker))
    for name in ("tuner.pkl", "trainable.pkl"):
        (sweep_dir / name).write_bytes(payload)
    (sweep_dir / "experiment_state-2026-01-01_00-00-00.json").write_text(
        json.dumps({"trial_data": [], "runner_data": payload.hex()}))


def test_crafted_tune_pickles_in_the_sweep_folder_never_run(tmp_path, shared_ray):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "planted", "base": "synthetic-supervised", "seeds": 1,
        "overrides": {"optim.steps": 100, "optim.warmup_steps": 0, "run.checkpoint_every": 100,
                      "run.log_every": 50, "run.workers": 1, "data.num_classes": 10, "data.dim": 5,
                      "model.hidden": [16], "probe.samples": 500, "data.generator_pool": 200},
        "resources": {"workers": 1, "cpus_per_worker": 1, "use_gpu": False}}, sort_keys=False))
    sweep_dir = tmp_path / "sweeps" / "planted"
    marker = tmp_path / MARKER
    args = ["sweep", str(spec), f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", "--storage", str(tmp_path / "sweeps")]

    plant_pickles(sweep_dir, marker)  # before the first run: the old code restored from these
    first = run_cli(args, cwd=tmp_path, env=shared_ray, timeout=600)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    assert not marker.exists(), "a pickle from the sweep folder was loaded"
    ledger = json.loads((sweep_dir / "trials" / "planted-s0.json").read_text())
    assert ledger["status"] == "finished" and len(ledger["attempts"]) == 1

    plant_pickles(sweep_dir, marker)  # again, over what Tune wrote: a rerun resumes from the ledger
    again = run_cli(args, cwd=tmp_path, env=shared_ray, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert not marker.exists(), "a pickle from the sweep folder was loaded on resume"
    assert "1 of 1 trials already ended" in again.stderr or "resuming" in again.stderr
    assert json.loads((sweep_dir / "trials" / "planted-s0.json").read_text())["attempts"] == ledger["attempts"]


def test_a_resume_reruns_exactly_the_trials_whose_ledger_shows_no_end(tmp_path, capsys):
    """The plan of a rerun comes from the JSON ledgers alone (no Tune state is read)."""
    from tune.folder import TrialLedger
    from tune.spec import build_plan, load_spec
    from tune.sweep import announce_resume, pending_trials

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "ledger", "base": "synthetic-supervised", "seeds": 4}))
    plan = build_plan(*load_spec(str(spec))[:1], spec_text=spec.read_text(), where=str(spec),
                      storage=str(tmp_path / "sweeps"))
    keys = [t.key for t in plan.trials]
    assert pending_trials(plan) == keys
    announce_resume(plan, keys)
    assert "resuming" not in capsys.readouterr().err  # a first run
    plant_pickles(plan.sweep_dir.local_path, tmp_path / MARKER)
    for key, status in zip(keys, ("finished", "stopped", "failed", None)):
        ledger = TrialLedger(plan.sweep_dir, key)
        ledger.start(run_id=None, resume_step=0)
        if status:
            ledger.end(status)
    assert pending_trials(plan) == keys[2:]  # failed and unfinished trials run again
    announce_resume(plan, pending_trials(plan))
    assert "2 of 4 trials already ended, 2 to run" in capsys.readouterr().err
    assert not (tmp_path / MARKER).exists()
