"""Benchmark 6, sweep throughput: `linrep reproduce synthetic --quick`, wall time and trials per hour.

The sweep runs as users run it (the CLI in a subprocess, a fresh folder so nothing resumes, Ray
Tune running as many trials at a time as the CPUs allow). The reference is what a user without
the sweep machinery would do: one `linrep train` per trial, one after another; it is measured by
timing one representative trial of each arm (supervised, DIET) with the very same overrides and
multiplying by the number of trials of that arm. The ratio is the sweep's trials per hour over
that sequential loop's.

Both use MLflow stores created before the clock starts (a fresh sqlite store's migrations take
seconds and are not what is measured). --quick shrinks the sweep to one seed and a tenth of the
steps (`--seeds 1 --budget 0.1`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from linrep.bench.harness import BenchContext, BenchResult, make_result, ratio_of, register_benchmark


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


def cli_value(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)


def representative_trials(quick: bool) -> tuple[list[Any], dict[str, int]]:
    """The first trial of each arm of the reproduce plan, and how many trials each arm has."""
    from tune.reproduce import build_reproduce_plan

    seeds = 1 if quick else None
    plan = build_reproduce_plan(quick=True, budget=0.1 if quick else 1.0, seeds=seeds)
    firsts: dict[str, Any] = {}
    counts: dict[str, int] = {}
    for t in plan.trials:
        counts[t.base] = counts.get(t.base, 0) + 1
        firsts.setdefault(t.base, t)
    return list(firsts.values()), counts


@register_benchmark("sweep", op=">=", target=1.0,
                    title="trials/hour of `linrep reproduce synthetic --quick` / one `linrep train` per trial")
def bench_sweep(ctx: BenchContext) -> BenchResult:
    args = ["reproduce", "synthetic", *sweep_args(ctx.quick)]
    work, uri = fresh_workdir(ctx, "sweep")
    ctx.log("sweep", f"linrep {' '.join(args)} in {work}")
    wall, text = run_cli(args, work, uri, "reproduce.log")
    match = re.search(r"reproduce: (\d+)/(\d+) trials finished", text)
    finished, total = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    ctx.log("sweep", f"{finished}/{total} trials in {wall:.1f} s")
    trials, counts = representative_trials(ctx.quick)
    per_arm: dict[str, float] = {}
    for trial in trials:
        work1, uri1 = fresh_workdir(ctx, "sweep-seq")
        overrides = [f"{k}={cli_value(v)}" for k, v in trial.overrides.items()]
        ctx.log("sweep", f"sequential reference: linrep train {trial.base} ({trial.key})")
        per_arm[trial.base], _ = run_cli(["train", trial.base, *overrides, "run.name=seq"], work1, uri1, "train.log")
        ctx.log("sweep", f"one {trial.base} trial: {per_arm[trial.base]:.1f} s")
    sequential = sum(per_arm[arm] * n for arm, n in counts.items() if arm in per_arm)
    n = sum(counts.values())
    sweep_tph = 3600 * finished / wall if wall > 0 else float("nan")
    seq_tph = 3600 * n / sequential if sequential > 0 else float("nan")
    ratio = ratio_of(sweep_tph, seq_tph)
    figures = {"sweep_wall_s": wall, "trials": float(total), "trials_finished": float(finished),
               "sweep_trials_per_hour": sweep_tph, "sequential_trials_per_hour": seq_tph,
               "sequential_estimate_s": sequential,
               **{f"one_trial_s_{arm}": v for arm, v in per_arm.items()}}
    details = {"command": f"linrep {' '.join(args)}", "workdir": str(work), "trials_per_arm": counts,
               "reference_trials": {t.base: t.key for t in trials}}
    summary = (f"linrep {' '.join(args)}: {finished}/{total} trials in {wall:.0f} s = {sweep_tph:.0f} trials/hour; "
               f"one `linrep train` per trial: ~{sequential:.0f} s = {seq_tph:.0f} trials/hour")
    return make_result("sweep", ratio, summary, figures=figures, details=details)
