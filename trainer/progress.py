"""The console a user watches, and the run's log file.

One long command (`linrep train`, `sweep`, `reproduce`) is one console session:

- Workers do not print progress; rank 0 prints one machine-readable line per event
  (`emit`: a step's figures, a resume, an early stop), prefixed with PROGRESS_MAGIC. Ray already
  streams every worker's and actor's output to the driver (log_to_driver), so progress needs no
  extra actor or queue: the driver's handler of that stream (`Session.worker_output`, hooked in
  with trainer.ray_private.route_worker_output) picks the progress lines out and sends every other
  line (Ray Train's controller and workers, the PlacementGroupCleaner, DeepSpeed, warnings) to
  the log file. This is the pattern of Ray's own distributed tqdm (tqdm_ray), which also rides on
  the log stream.
- The driver renders one display: a tqdm bar (step, ETA, loss, acc, samples/s, the latest probe
  figure) when stdout is a terminal; plain `[linrep] step ...` lines every PLAIN_EVERY_S seconds
  (and at the first and the last step) when it is not, without ANSI codes.
- Ray's, MLflow's and the driver's own library messages (Python logging, warnings, anything
  written to file descriptor 2 by native code) go to the log file: a staging file under the
  temporary folder until the run folder is known, then `<run folder>/linrep.log` (local run
  folders; a run folder on S3 keeps the local file) and, at the end of `fit`, an MLflow artifact
  of the run (logs/linrep.log).
- `--verbose` (LINREP_VERBOSE=1) shows everything as Ray prints it, and still writes the log.
- On failure the console gets the log file's path and its last lines; the CLI prints the error.

tqdm is a dependency already (DeepSpeed's); rich is only a dev tool's in the lock.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

PROGRESS_MAGIC = "@linrep-progress "
LOG_NAME = "linrep.log"
VERBOSE_ENV = "LINREP_VERBOSE"
PLAIN_EVERY_ENV = "LINREP_PROGRESS_EVERY_S"
PLAIN_EVERY_S = 10.0      # plain lines when stdout is not a terminal: at most one per 10 s
FAILURE_TAIL_LINES = 15
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


# ---- worker side -------------------------------------------------------------------------------
# lines a worker or actor prints that are linrep's own messages to the user (a tracking outage, a
# probe given up), shown on the console as well as in the log
OWN_WARNINGS = ("warning: ", "MLflow writes resumed")


def emit(kind: str, **fields: Any) -> None:
    """One progress event from a worker (rank 0) to the driver's display, through Ray's log stream;
    straight to the display when the run trains in the console's own process (run.in_process)."""
    event = {"kind": kind, **fields}
    if _SESSION is not None:
        _SESSION.on_event(event)
        return
    print(PROGRESS_MAGIC + json.dumps(event, separators=(",", ":")), flush=True)


def parse_event(line: str) -> dict | None:
    """The event of a progress line (Ray may prefix a line with ANSI codes), or None."""
    at = line.find(PROGRESS_MAGIC)
    if at < 0:
        return None
    try:
        event = json.loads(line[at + len(PROGRESS_MAGIC):])
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


# ---- displays ----------------------------------------------------------------------------------
def probe_text(event: dict) -> str:
    """'probe r2_affine 0.9931 @400' / 'val acc 0.912 @400' from a step event, or ''."""
    if "probe" not in event:
        return ""
    label = "probe r2_affine" if event.get("probe_key") == "probe/r2_affine" else "val acc"
    return f"{label} {event['probe']:.4f} @{event.get('probe_step', 0)}"


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Rate:
    """Steps per second since the first step event seen (a resumed run counts from its resume)."""

    def __init__(self):
        self.first: tuple[float, int] | None = None

    def eta(self, step: int, total: int) -> float | None:
        now = time.monotonic()
        if self.first is None:
            self.first = (now, step)
            return None
        t0, s0 = self.first
        if step <= s0:
            return None
        return (total - step) * (now - t0) / (step - s0)


class PlainDisplay:
    """`[linrep] step 100/2000  loss ...  eta 0:42` every PLAIN_EVERY_S seconds, first and last step."""

    def __init__(self, out: TextIO, every_s: float):
        self.out, self.every_s = out, every_s
        self.rate = Rate()
        self.last_print = -float("inf")

    def step(self, e: dict) -> None:
        eta = self.rate.eta(e["step"], e["total"])
        now = time.monotonic()
        if now - self.last_print < self.every_s and e["step"] != e["total"]:
            return
        self.last_print = now
        probe = probe_text(e)
        self.note(f"step {e['step']}/{e['total']}  loss {e['loss']:.4f}  acc {e['acc']:.3f}  "
                  f"{e['samples_per_s']:,.0f} samples/s  eta {format_eta(eta)}" + (f"  | {probe}" if probe else ""))

    def note(self, text: str) -> None:
        self.out.write(f"[linrep] {text}\n")
        self.out.flush()

    def close(self) -> None:
        pass


class BarDisplay(PlainDisplay):
    """A tqdm bar on a terminal: step/total, ETA and rate by tqdm; loss, acc, samples/s, probe after it."""

    def __init__(self, out: TextIO, every_s: float):
        super().__init__(out, every_s)
        self.bar = None

    def step(self, e: dict) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=e["total"], initial=e["step"], file=self.out, unit="step", dynamic_ncols=True,
                            desc="train")
        self.bar.update(e["step"] - self.bar.n)
        probe = probe_text(e)
        self.bar.set_postfix_str(f"loss {e['loss']:.4f} acc {e['acc']:.3f} {e['samples_per_s']:,.0f} samples/s"
                                 + (f" | {probe}" if probe else ""))

    def note(self, text: str) -> None:
        if self.bar is None:
            super().note(text)
        else:
            self.bar.write(f"[linrep] {text}", file=self.out)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class SweepBoard:
    """A sweep's live table of trials, from their step events: one row per trial (running, or
    finished once its last step is in; a trial_end event from the sweep ends a row that stopped
    before its last step: run.stop_at, a scheduler, a failure). On a terminal the table is redrawn in place (at most twice a
    second); otherwise it is printed as plain lines every PLAIN_EVERY_S seconds. Trial events
    (started, finished with its figure, stopped early, failed) are the sweep's own lines."""

    def __init__(self, out: TextIO, is_tty: bool, every_s: float):
        self.out, self.is_tty = out, is_tty
        self.every_s = 0.5 if is_tty else every_s
        self.rows: dict[str, dict] = {}
        self.last_draw = -float("inf")
        self.drawn_lines = 0

    def __call__(self, event: dict) -> None:
        kind, run = event.get("kind"), event.get("run")
        if kind == "trial_end" and run in self.rows:
            self.rows[run] = {**self.rows[run], "ended": str(event.get("status") or "finished")}
        elif kind == "step" and run:
            self.rows[run] = event      # a later step (a resumed trial) is running again
        else:
            return
        now = time.monotonic()
        if now - self.last_draw >= self.every_s or kind == "trial_end":
            self.last_draw = now
            self.draw()

    @staticmethod
    def state(row: dict) -> str:
        return row.get("ended") or ("finished" if row["step"] >= row["total"] else "running")

    def table(self) -> list[str]:
        by_state: dict[str, list[dict]] = {"running": [], "finished": []}
        for r in self.rows.values():
            by_state.setdefault(self.state(r), []).append(r)
        width = max((len(r["run"]) for r in self.rows.values()), default=5)
        # running and finished always shown; other states (stopped, failed) only once they occur
        lines = ["[sweep] trials: " + ", ".join(f"{len(rows)} {state}" for state, rows in by_state.items())]
        for state, rows in by_state.items():
            for r in sorted(rows, key=lambda r: r["run"]):
                probe = probe_text(r)
                lines.append(f"  {r['run']:<{width}}  {state:<8}  step {r['step']}/{r['total']}  "
                             f"loss {r['loss']:.4f}  acc {r['acc']:.3f}" + (f"  {probe}" if probe else ""))
        return lines

    def draw(self) -> None:
        lines = self.table()
        if self.is_tty and self.drawn_lines:
            self.out.write(f"\x1b[{self.drawn_lines}F\x1b[J")  # back to the table's first line, clear below
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()
        self.drawn_lines = len(lines) if self.is_tty else 0


# ---- the session -------------------------------------------------------------------------------
class LogFile:
    """The log file every routed line goes to; `move_to` continues it in another local file."""

    def __init__(self, path: Path):
        self.lock = threading.Lock()
        self.path = path
        self.lost: str | None = None  # why the file stopped taking lines (a full or read-only disk)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(path, "a", buffering=1, encoding="utf-8", errors="replace")

    def write(self, text: str) -> int:
        from trainer.tracking import scrub_env_secrets

        self._guarded(lambda: self.fh.write(scrub_env_secrets(ANSI.sub("", text))))
        return len(text)

    def flush(self) -> None:
        self._guarded(lambda: self.fh.flush())

    def _guarded(self, io_call) -> None:
        """The log is a record, not the run: a full disk under the run folder (where the log lives)
        must not turn every logged line into logging's "--- Logging error ---" traceback on the
        console, nor hide the run's own failure. After the first OSError lines are dropped (end_run
        says so)."""
        with self.lock:
            if self.fh.closed or self.lost is not None:
                return
            try:
                io_call()
            except OSError as err:
                self.lost = err.strerror or err.__class__.__name__

    def fileno(self) -> int:
        return self.fh.fileno()

    def isatty(self) -> bool:
        return False

    def move_to(self, path: Path) -> None:
        """Append what is written so far to `path` and go on writing there (a resumed run's log grows)."""
        if path == self.path:
            return
        with self.lock:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self.fh.flush()
                with open(path, "a", encoding="utf-8") as dst, \
                        open(self.path, encoding="utf-8", errors="replace") as src:
                    shutil.copyfileobj(src, dst)
            except OSError:  # a full or read-only run folder: the log stays where it is
                return
            self.fh.close()
            os.unlink(self.path)
            self.path = path
            self.fh = open(path, "a", buffering=1, encoding="utf-8", errors="replace")

    def tail(self, lines: int) -> list[str]:
        self.flush()
        try:
            return self.path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
        except OSError:
            return []


def staging_log_path() -> Path:
    return Path(tempfile.gettempdir()) / "linrep-logs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


class Session:
    """This process's console and log file (module-global: one per command)."""

    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.log = LogFile(staging_log_path())
        self.console = sys.stdout
        self.is_tty = bool(getattr(sys.stdout, "isatty", lambda: False)())
        every = float(os.environ.get(PLAIN_EVERY_ENV, PLAIN_EVERY_S))
        self.display: PlainDisplay = (BarDisplay if self.is_tty else PlainDisplay)(self.console, every)
        self.listeners: list = []        # extra consumers of progress events (the sweep's table)
        self.ray_print = None            # Ray's own handler of worker output (verbose: kept)
        self._saved_fd2: int | None = None

    # -- before ray.init: the driver's own library output -------------------------------------
    def capture_driver_output(self) -> None:
        """Warnings and native writes to fd 2 go to the log; sys.stderr stays the console's."""
        if not self.is_tty:
            os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # no ANSI codes in piped output
        if self.verbose:
            return
        warnings.showwarning = self._log_warning
        try:
            sys.stderr.flush()
            self._saved_fd2 = os.dup(2)
            console_err = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
            os.dup2(self.log.fileno(), 2)
            sys.stderr = console_err
        except (OSError, ValueError):  # no real fd 2 (an embedding host): Python-level routing only
            self._saved_fd2 = None

    def _log_warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        self.log.write(warnings.formatwarning(message, category, filename, lineno, line))

    # -- after ray.init ----------------------------------------------------------------------
    def capture_ray(self) -> None:
        """Ray's worker-output stream through `worker_output`; the driver's loggers into the log."""
        from trainer.ray_private import route_worker_output

        self.ray_print = route_worker_output(self.worker_output)
        if not self.verbose:
            self.route_loggers()

    def route_loggers(self) -> None:
        """Every logging.StreamHandler writing to the console (Ray's, MLflow's ...) writes to the log."""
        consoles = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__, self.console)}
        loggers = [logging.getLogger()] + [l for l in logging.Logger.manager.loggerDict.values()
                                           if isinstance(l, logging.Logger)]
        for logger in loggers:
            for handler in logger.handlers:
                if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
                        and id(handler.stream) in consoles:
                    handler.setStream(self.log)

    def worker_output(self, data: dict) -> None:
        """Ray's batch of output lines from one worker/actor: progress events to the display, the rest
        to the log (and, with --verbose, to the console as Ray prints it)."""
        rest = []
        autoscaler = data.get("pid") == "autoscaler"  # its status table every 5 s; Ray shows only events
        for line in data.get("lines", []):
            if autoscaler and "event_summary" not in line:
                continue
            event = parse_event(line)
            if event is None:
                rest.append(line)
            else:
                self.on_event(event)
        if not rest:
            return
        if not self.verbose:  # linrep's own warnings from workers and actors stay on the console
            for line in rest:
                if line.startswith(OWN_WARNINGS):
                    self.display.note(line)
        who = data.get("actor_name") or data.get("task_name") or ""
        ip = data.get("ip")
        where = f"({who + ' ' if who else ''}pid={data.get('pid')}{', ip=' + ip if ip and ip != data.get('localhost') else ''})"
        self.log.write("".join(f"{where} {line}\n" for line in rest))
        if self.verbose and self.ray_print is not None:
            self.ray_print({**data, "lines": rest})

    def on_event(self, event: dict) -> None:
        try:
            for listener in self.listeners:
                listener(event)
            if event.get("kind") == "step" and not self.listeners:
                self.display.step(event)
            elif event.get("kind") == "note":
                if self.listeners:  # a sweep: a trial's notes (resumed from ...) go to the log
                    self.log.write(f"[linrep] {event.get('run', '')} {event['text']}\n")
                else:
                    self.display.note(event["text"])
        except Exception as err:  # a display fault must never stop Ray's log thread
            self.log.write(f"[linrep] display error: {err.__class__.__name__}: {err}\n")

    # -- one run -------------------------------------------------------------------------------
    def attach_run(self, run_dir) -> None:
        """A local run folder holds the log from now on (what came before is copied in)."""
        if run_dir.is_local:
            self.log.move_to(run_dir.local_path / LOG_NAME)
            if self._saved_fd2 is not None:
                os.dup2(self.log.fileno(), 2)  # native writes follow the log to its new file
        self.log.write(f"[linrep] log of run folder {run_dir}\n")

    def end_run(self, failed: bool) -> None:
        self.display.close()
        self.display.rate = Rate()
        if failed and not self.verbose:
            tail = self.log.tail(FAILURE_TAIL_LINES)
            if tail:
                self.console.write("[linrep] the log's last lines:\n" + "\n".join(f"  {l}" for l in tail) + "\n")
        lost = f" (cut short: {self.log.lost})" if self.log.lost else ""
        self.console.write(f"[linrep] log (Ray and library messages): {self.log.path}{lost}\n")
        self.console.flush()

    def note(self, text: str) -> None:
        self.display.note(text)


_SESSION: Session | None = None


def start_session(verbose: bool | None = None) -> Session:
    """This process's session, started on first call (before ray.init: fd 2 is routed first)."""
    global _SESSION
    if _SESSION is None:
        if verbose is None:
            verbose = os.environ.get(VERBOSE_ENV, "") not in ("", "0")
        _SESSION = Session(verbose)
        _SESSION.capture_driver_output()
    return _SESSION


def current_session() -> Session | None:
    return _SESSION


def watch_sweep(sweep_dir) -> SweepBoard | None:
    """The sweep's table of trials on this driver's console; the log moves to <sweep folder>/linrep.log."""
    session = current_session()
    if session is None:
        return None
    board = SweepBoard(session.console, session.is_tty, session.display.every_s)
    session.listeners.append(board)
    if sweep_dir.is_local:
        session.log.move_to(sweep_dir.local_path / LOG_NAME)
        if session._saved_fd2 is not None:
            os.dup2(session.log.fileno(), 2)
    session.console.write(f"[linrep] log (Ray and library messages): {session.log.path}\n")
    return board
