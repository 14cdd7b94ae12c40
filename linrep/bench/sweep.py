"""Benchmark 6, sweep efficiency: `linrep reproduce synthetic --quick` against its compute floor.

The sweep runs as users run it (the CLI in a subprocess, a fresh folder so nothing resumes, Ray
Tune running as many trials at a time as the CPUs allow). The floor is the same trials' work with
no framework at all: for each trial of the plan, a plain single-threaded loop in one process runs
that trial's training steps (`trainer.loop.build_worker` + `train_step`, the worker's own code)
and its probes (the probe family's own function, at every step the trial would checkpoint and
probe), one trial after another. Building the data and model is not counted: it is set-up too.

    efficiency = F / (c x W)

F is the floor's seconds summed over the trials, c the trials the sweep runs at once (what it
prints: "up to c trials at a time") and W the sweep's wall time. 1.0 would be a sweep that costs
nothing but its trials' steps; what is left is the command's own start (interpreter, Ray, the
MLflow parent run) and end (summary, plots), and per trial its start-up (the MLflow child run, the
probe actor; the trials train inside warm Tune trial processes, tune/sweep.py) and its end.
The result also says that overhead per trial, (c x W - F) / trials, and the same ratio over the
trials' span alone (first trial start to last trial end, from the ledgers).

Both use MLflow stores created before the clock starts (a fresh sqlite store's migrations take
seconds and are not what is measured). --quick shrinks the sweep to one seed and a tenth of the
steps (`--seeds 1 --budget 0.1`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from linrep.bench.harness import BenchContext, BenchResult, make_result, ratio_of, register_benchmark, run_isolated


def sweep_args(quick: bool) -> list[str]:
    return ["--quick", "--seeds", "1", "--budget", "0.1"] if quick else ["--quick"]


def fresh_workdir(ctx: BenchContext, label: str) -> tuple[Path, str]:
    """A new folder with an MLflow store that is already created (migrated)."""
    from trainer.tracking import ensure_experiment

    work = ctx.cache / f"{label}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    (work / "mlruns").mkdir(parents=True)
    uri = f"sqlite:///{(work / 'mlruns' / 'mlflow.db').resolve()}"
    ensure_experiment(uri, "synthetic")
    return work, uri


def run_cli(args: list[str], work: Path, uri: str, log_name: str, timeout_s: float = 3600) -> tuple[float, str]:
    """Run `linrep ARGS` in `work`; (wall seconds, output). Raises with the log's tail on failure."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "linrep", *args], cwd=work, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    wall = time.perf_counter() - t0
    text = proc.stdout + proc.stderr
    (work / log_name).write_text(text)
    if proc.returncode != 0:
        tail = "\n".join(text.strip().splitlines()[-10:])
        raise RuntimeError(f"linrep {' '.join(args[:3])} failed (exit {proc.returncode}):\n{tail}")
    return wall, text


def plan_configs(quick: bool) -> list[tuple[str, dict]]:
    """(trial key, config as a dict) for every trial of the reproduce plan the sweep runs."""
    from tune.reproduce import build_reproduce_plan
    from tune.spec import trial_config

    plan = build_reproduce_plan(quick=True, budget=0.1 if quick else 1.0, seeds=1 if quick else None)
    return [(t.key, trial_config(t).to_dict()) for t in plan.trials]


def probe_steps(steps: int, checkpoint_every: int, probe_every: int) -> list[int]:
    """The steps a trial checkpoints and probes: every checkpoint_every-th (and the last), every
    probe_every-th of those."""
    ckpts = sorted({*range(checkpoint_every, steps + 1, checkpoint_every), steps})
    return [s for i, s in enumerate(ckpts, 1) if i % probe_every == 0 or s == steps]


def floor_seconds(configs: list[tuple[str, dict]]) -> dict[str, dict[str, float]]:
    """Each trial's steps and probes in a plain single-threaded loop: {key: {train_s, probe_s}}.

    Runs in its own process (run_isolated), one trial after another."""
    import torch

    from linrep.bench.harness import limit_threads
    from probes.actor import probe_model
    from trainer.config import from_dict
    from trainer.loop import build_worker, train_step

    limit_threads(1)
    out: dict[str, dict[str, float]] = {}
    for key, config in configs:
        cfg = from_dict(config)
        data, engine = build_worker(cfg, 0, 1, torch.device("cpu"))
        batches = data.batches(0)
        probe_at = set(probe_steps(cfg.optim.steps, cfg.run.checkpoint_every, cfg.probe.every)) \
            if cfg.probe.enabled else set()
        state: dict = {}
        train_s = probe_s = 0.0
        engine.train()
        for step in range(1, cfg.optim.steps + 1):
            t0 = time.perf_counter()
            x, y = next(batches)
            loss, acc = train_step(engine, x, y, cfg.optim.label_smoothing)
            float(loss), float(acc)  # what the worker's loop does every step
            train_s += time.perf_counter() - t0
            if step in probe_at:
                t0 = time.perf_counter()
                engine.module.eval()
                with torch.no_grad():
                    probe_model(engine.module, cfg, {"step": step}, state)
                engine.module.train()
                probe_s += time.perf_counter() - t0
        out[key] = {"train_s": train_s, "probe_s": probe_s, "steps": float(cfg.optim.steps),
                    "probes": float(len(probe_at))}
    return out


def trial_walls(sweep_dir: Path) -> list[float]:
    """Seconds from start to end of each trial's attempts, from the sweep folder's trial ledgers."""
    from tune.folder import trial_attempts

    return [sum(a["end"] - a["start"] for a in attempts if a.get("end") and a.get("start"))
            for attempts in trial_attempts(sweep_dir).values()]


def trials_span(sweep_dir: Path) -> float:
    """Seconds from the first trial's start to the last trial's end (the sweep without the CLI's
    interpreter, Ray start and summary), from the trial ledgers; nan without ledgers."""
    from tune.folder import trial_attempts

    attempts = [a for trial in trial_attempts(sweep_dir).values() for a in trial if a.get("start") and a.get("end")]
    return max(a["end"] for a in attempts) - min(a["start"] for a in attempts) if attempts else float("nan")


def sweep_folder(work: Path) -> Path | None:
    """The sweep's folder: the one under the work folder that holds a trials/ ledger."""
    found = sorted(work.glob("**/trials"))
    return found[0].parent if found else None


@register_benchmark("sweep", op=">=", target=0.7,
                    title="sweep efficiency of `linrep reproduce synthetic --quick`: "
                          "its trials' plain-loop seconds / (trials at once x wall)")
def bench_sweep(ctx: BenchContext) -> BenchResult:
    args = ["reproduce", "synthetic", *sweep_args(ctx.quick)]
    work, uri = fresh_workdir(ctx, "sweep")
    ctx.log("sweep", f"linrep {' '.join(args)} in {work}")
    wall, text = run_cli(args, work, uri, "reproduce.log")
    match = re.search(r"reproduce: (\d+)/(\d+) trials finished", text)
    finished, total = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    at_once = re.search(r"up to (\d+) trials at a time", text)
    concurrency = int(at_once.group(1)) if at_once else 1
    ctx.log("sweep", f"{finished}/{total} trials in {wall:.1f} s, {concurrency} at a time")
    configs = plan_configs(ctx.quick)
    ctx.log("sweep", f"the floor: the {len(configs)} trials' steps and probes in a plain single-threaded loop")
    floor = run_isolated(floor_seconds, configs=configs)
    floor_s = sum(f["train_s"] + f["probe_s"] for f in floor.values())
    efficiency = ratio_of(floor_s, concurrency * wall)
    folder = sweep_folder(work) or work
    walls, span = trial_walls(folder), trials_span(folder)
    overhead = (concurrency * wall - floor_s) / max(1, len(configs))
    # the same ratio over the trials' span only: what the sweep costs beyond the command's fixed
    # start (interpreter, Ray, the MLflow parent run) and end (summary, plots)
    span_efficiency = ratio_of(floor_s, concurrency * span)
    ctx.log("sweep", f"floor {floor_s:.1f} s; efficiency {efficiency:.3f}; ~{overhead:.1f} s per trial beyond its steps; "
                     f"trials from first start to last end {span:.1f} s (efficiency over that span {span_efficiency:.3f})")
    figures = {"sweep_wall_s": wall, "trials": float(total), "trials_finished": float(finished),
               "trials_at_once": float(concurrency), "floor_s": floor_s,
               "floor_train_s": sum(f["train_s"] for f in floor.values()),
               "floor_probe_s": sum(f["probe_s"] for f in floor.values()),
               "overhead_per_trial_s": overhead, "trials_span_s": span, "efficiency_over_trials_span": span_efficiency,
               "trial_wall_mean_s": sum(walls) / len(walls) if walls else float("nan"),
               "sweep_trials_per_hour": 3600 * finished / wall if wall > 0 else float("nan")}
    details = {"command": f"linrep {' '.join(args)}", "workdir": str(work), "floor_per_trial": floor,
               "trial_walls_s": [round(w, 2) for w in walls]}
    summary = (f"linrep {' '.join(args)}: {finished}/{total} trials in {wall:.0f} s, {concurrency} at a time; "
               f"their steps and probes in a plain loop: {floor_s:.1f} s; ~{overhead:.0f} s per trial beyond them; "
               f"the trials alone (first start to last end, {span:.0f} s): {span_efficiency:.2f}")
    return make_result("sweep", efficiency, summary, figures=figures, details=details)
