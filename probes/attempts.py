"""How many times each checkpoint's probe was started, kept where a dying actor cannot lose it.

The probe actor restarts when its process dies (max_restarts=-1), and Ray re-runs the call it was
running (max_task_retries=-1: queued calls, which Ray also fails when the actor dies, must survive
any number of restarts). A checkpoint whose probe kills the process every time (out of memory, a
segfault) would then be retried forever and the run would never end. So the actor counts each
attempt in `probe_attempts.json` in the run folder, before it starts; an attempt past
probe.max_attempts records the checkpoint as failed and returns, and the actor moves on.

The ledger: {"<step>": {"attempts": n, "state": "probing" | "done" | "failed", "pid": pid of the
process that made the last attempt, "reason": why it failed}}. One actor per run writes it, one
call at a time; writes are atomic (a local rename through trainer.storage, one PUT on S3).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from trainer.storage import Location, locate

LEDGER_FILE = "probe_attempts.json"


RunDir = "str | Path | Location"  # a local run folder or its storage URI


def read_ledger(run_dir: RunDir) -> dict[int, dict[str, Any]]:
    """step -> entry; {} when there is none (or it is unreadable: counting starts again)."""
    try:
        raw = json.loads((locate(run_dir) / LEDGER_FILE).read_text())
        return {int(k): v for k, v in raw.items() if isinstance(v, dict)}
    except (OSError, ValueError, AttributeError):
        return {}


def _write(run_dir: RunDir, ledger: dict[int, dict[str, Any]]) -> None:
    (locate(run_dir) / LEDGER_FILE).write_json({str(k): v for k, v in sorted(ledger.items())})


def is_done(run_dir: RunDir, step: int) -> bool:
    return read_ledger(run_dir).get(step, {}).get("state") == "done"


def start_attempt(run_dir: RunDir, step: int, max_attempts: int) -> int | None:
    """Count one more attempt at `step`, written before the probe starts, and return its number;
    None when `max_attempts` are used up (nothing is written then).

    The state stays 'probing' until `finish` changes it: an entry still 'probing' means a process
    died in the middle of that attempt."""
    ledger = read_ledger(run_dir)
    entry = ledger.get(step, {})
    # after 'failed' the count goes on, so a raised probe.max_attempts gives it another try
    before = int(entry.get("attempts", 0))
    if before >= max_attempts:
        return None
    ledger[step] = {"attempts": before + 1, "state": "probing", "pid": os.getpid()}
    _write(run_dir, ledger)
    return before + 1


def finish(run_dir: RunDir, step: int, state: str, reason: str | None = None) -> None:
    """Record the outcome of `step`'s probe: 'done' or 'failed' (with the reason)."""
    ledger = read_ledger(run_dir)
    entry = {**ledger.get(step, {"attempts": 0}), "state": state}
    if reason:
        entry["reason"] = reason
    ledger[step] = entry
    _write(run_dir, ledger)
