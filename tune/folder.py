"""The sweep folder, <storage>/<sweep name>/: what a sweep keeps on disk besides Tune's own state.

  linrep_sweep.json     the state: parent MLflow run id, the plan's fingerprint, the experiment
  plan.json             the plan (every trial's key, base and overrides)
  runs/<trial key>/     each trial's Ray Train run (checkpoints; written by the trainer)
  trials/<key>.json     the trial's ledger: every start, the end, the final figures
  trials/<key>.stop     exists while Tune stops the trial (scheduler decision, driver interrupt)
  trials/<key>.stopped  the scheduler ended the trial early (written by the driver)

The folder is a local path or a URI (s3://...): every file goes through trainer.storage and is
written atomically (a local temp file + rename, or one object PUT): a driver killed mid-write
leaves the old file or the new one, and a rerun of the same command reads it back to resume. Both the driver (tune.sweep)
and the summary (tune.summary) read the folder through this module; it imports neither.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from trainer.errors import UserError
from trainer.storage import Location, locate

Folder = Path | str | Location  # a sweep folder: a local path, a URI or a Location

STATE_FILE = "linrep_sweep.json"
PLAN_FILE = "plan.json"
TRIALS_DIR = "trials"
TERMINAL = ("finished", "stopped")  # a trial in one of these states is never run again


def read_json(path: Folder) -> dict[str, Any] | None:
    """A JSON object from `path`; None when the file is missing, UserError when it is damaged."""
    try:
        data = json.loads(locate(path).read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        raise UserError(f"{path} is damaged (not valid JSON); delete it to start that sweep afresh") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is damaged (not a JSON object)")
    return data


def read_state(sweep_dir: Folder) -> dict[str, Any] | None:
    """The sweep's state file, or None for a sweep never started in this folder."""
    return read_json(locate(sweep_dir) / STATE_FILE)


def write_state(sweep_dir: Folder, state: dict[str, Any]) -> None:
    (locate(sweep_dir) / STATE_FILE).write_json(state)


def write_plan(sweep_dir: Folder, plan_json: str) -> None:
    (locate(sweep_dir) / PLAN_FILE).write_text(plan_json)


class TrialLedger:
    """trials/<key>.json: the attempts of one trial and its end, written atomically by the trial."""

    def __init__(self, sweep_dir: Folder, key: str):
        self.folder = locate(sweep_dir) / TRIALS_DIR
        self.path = self.folder / f"{key}.json"
        self.key = key

    def read(self) -> dict[str, Any]:
        try:
            d = read_json(self.path) or {}
        except UserError:
            d = {}  # a torn ledger only costs a rerun of that trial (it resumes from checkpoints)
        if d.get("status") != "finished" and self.stopped_marker.exists():
            d["status"] = "stopped"
        return d

    @property
    def stopped_marker(self) -> Location:
        """Written by the driver when the scheduler ended the trial early (its own file: no races)."""
        return self.folder / f"{self.key}.stopped"

    def mark_stopped(self) -> None:
        self.stopped_marker.touch()

    @property
    def status(self) -> str | None:
        return self.read().get("status")

    def start(self, run_id: str | None, resume_step: int) -> None:
        d = self.read()
        attempts = d.get("attempts", [])
        attempts.append({"start": time.time(), "pid": os.getpid(), "resume_step": resume_step})
        self.path.write_json({**d, "key": self.key, "run_id": run_id, "status": "running", "attempts": attempts})

    def end(self, status: str, **extra: Any) -> None:
        """Close the current attempt; a terminal status the driver already set (stopped) is kept."""
        d = self.read()
        if d.get("status") in TERMINAL and status not in TERMINAL:
            status = d["status"]
        attempts = d.get("attempts", [])
        if attempts:
            attempts[-1]["end"] = time.time()
            attempts[-1]["status"] = status
        self.path.write_json({**d, "key": self.key, "status": status, "attempts": attempts, **extra})

    @property
    def stop_flag(self) -> Location:
        """Exists while Tune wants this trial stopped (scheduler decision or driver interrupt)."""
        return self.folder / f"{self.key}.stop"


def trial_attempts(sweep_dir: Folder) -> dict[str, list[dict[str, Any]]]:
    """Every trial's attempts ({start, end, status, pid, resume_step}), by trial key, from the
    ledgers in the sweep folder (trials not started yet have none)."""
    folder = locate(sweep_dir) / TRIALS_DIR
    keys = sorted(name[:-len(".json")] for name in folder.files() if name.endswith(".json") and "/" not in name)
    return {key: TrialLedger(sweep_dir, key).read().get("attempts", []) for key in keys}


def ledger_counts(sweep_dir: Folder, keys: list[str]) -> dict[str, int]:
    """How many of the trials `keys` are in each status (pending: no ledger yet)."""
    counts: dict[str, int] = {}
    for key in keys:
        status = TrialLedger(sweep_dir, key).status or "pending"
        counts[status] = counts.get(status, 0) + 1
    return counts
