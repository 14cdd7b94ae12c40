"""`linrep bench [name ...] [--out results/bench] [--quick] [--no-mlflow]`: performance, as ratios.

Benchmarks (one module each, registered in linrep.bench.harness):
  identifiability  time to R² z̃->z >= 0.99, linrep vs a loop like the paper's public code   (<= 0.1)
  overhead         samples/s of 1 Ray Train worker over the plain loop                       (>= 0.85)
  streaming        dSprites MLP samples/s from WebDataset shards over an in-memory tensor     (>= 0.9)
  scaling          parallel efficiency of 2 workers (+ one GPU's samples/s when present)      (>= 0.8)
  probes           training samples/s with the probe actor beside it over without            (>= 0.9)
  sweep            efficiency of `linrep reproduce synthetic --quick`: its trials' plain-loop s / (at once x wall) (>= 0.7)
  ckpt-storage     wall time with checkpoints in S3 (a moto server on 127.0.0.1) over a local folder (<= 1.5)
  imagenet-input   ImageNet input samples/s on CPU, shard pipeline (uint8) over ImageFolder + DataLoader (>= 1.2)

`linrep bench` with no name runs the six of the README's Performance table (harness.ORDER);
ckpt-storage and imagenet-input run when named (`linrep bench ckpt-storage [--quick]`).

Each prints the machine, its absolute figures and, last, `<name>: ratio <value> (target <op> <value>)`;
writes `<out>/<name>.json` (atomically; `<name>.<gpu>.json` on an accelerator) and a line of
`<out>/history.jsonl`; logs a run to MLflow experiment `bench` (unless --no-mlflow); a full run
(not --quick) regenerates the README's Performance table from the JSON files.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from linrep.bench import harness
from linrep.bench.harness import (BenchContext, BenchResult, describe_machine, get_benchmark, list_benchmarks,
                                  load_average, machine_line, save_result)
from trainer.errors import UserError

# importing the modules registers the benchmarks
from linrep.bench import identifiability, overhead, probe, scaling, streaming, sweep  # noqa: E402,F401
from linrep.bench import ckpt_storage, imagenet_input  # noqa: E402,F401  (by name only: not in harness.ORDER)

__all__ = ["bench_cli", "run_benchmark", "list_benchmarks"]


def _print_result(result: BenchResult) -> None:
    m = result.machine
    print(f"machine: {machine_line(m)}; device {m.get('device', 'cpu')}; load average "
          f"{result.load.get('before', ['?'])[0]} -> {result.load.get('after', ['?'])[0]}; "
          f"{result.wall_s:.0f} s{' (--quick)' if result.quick else ''}")
    print(result.summary)
    width = max((len(k) for k in result.figures), default=10)
    for key, value in result.figures.items():
        text = f"{value:,.4g}" if isinstance(value, float) and math.isfinite(value) and abs(value) < 1e4 else \
            f"{value:,.0f}" if isinstance(value, (int, float)) and math.isfinite(value) else str(value)
        print(f"  {key:<{width}}  {text}")
    if result.details.get("error"):
        print(f"error: {result.details['error']}")
    print(result.ratio_line(), flush=True)


def run_benchmark(name: str, ctx: BenchContext, machine: dict | None = None) -> BenchResult:
    """Run one benchmark; a failure becomes a result with ratio nan and the error in its details."""
    bench = get_benchmark(name)
    machine = machine or describe_machine()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    before = load_average()
    t0 = time.perf_counter()
    try:
        result = bench.run(ctx)
    except KeyboardInterrupt:
        raise
    except Exception as err:  # one benchmark's fault must not lose the others' results
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        ctx.log(name, f"failed: {err.__class__.__name__}: {first}")
        result = harness.make_result(name, float("nan"), f"{name} failed: {err.__class__.__name__}: {first}",
                                     details={"error": f"{err.__class__.__name__}: {first}"})
    result.machine, result.quick, result.started = machine, ctx.quick, started
    result.wall_s = time.perf_counter() - t0
    result.load = {"before": before, "after": load_average()}
    from trainer.tracking import git_commit

    result.git_commit = git_commit()
    return result


def bench_cli(args) -> int:
    """Entry point of `linrep bench` (wired by linrep/cli.py)."""
    names = list(getattr(args, "names", None) or harness.ORDER)
    for name in names:
        get_benchmark(name)  # unknown names: one line, exit 2, before anything runs
    out = Path(getattr(args, "out", None) or "results/bench")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {out}: cannot create the results folder ({err.strerror})") from None
    mlflow = not getattr(args, "no_mlflow", False)
    uri = None
    if mlflow:
        from trainer import tracking
        from trainer.config import TrackingConfig

        uri = tracking.resolve_uri(TrackingConfig())
        tracking.check_reachable(uri)
    ctx = BenchContext(out=out, quick=bool(getattr(args, "quick", False)), mlflow=mlflow, tracking_uri=uri)
    machine = describe_machine()
    print(f"linrep bench: {', '.join(names)}{' (--quick)' if ctx.quick else ''} on {machine_line(machine)}",
          flush=True)
    failed = 0
    for name in names:
        print(f"\n== {name}: {get_benchmark(name).title} ==", flush=True)
        result = run_benchmark(name, ctx, machine)
        path = save_result(result, out)
        if uri:
            try:
                harness.log_result_to_mlflow(result, path, uri)
            except Exception as err:  # the JSON is written; a tracking hiccup is only reported
                print(f"warning: could not log {name} to MLflow ({err.__class__.__name__})", file=sys.stderr)
        _print_result(result)
        failed += bool(result.details.get("error"))
    if not ctx.quick:
        from linrep.bench.readme import default_readme, update_readme

        readme = default_readme()
        # only the README's own results folder feeds its table (an --out elsewhere is a private run)
        if readme is not None and Path(out).resolve() == (readme.parent / "results" / "bench").resolve():
            update_readme(out, readme)
            print(f"\nREADME Performance table regenerated from {out}/*.json ({readme})", file=sys.stderr)
    return 1 if failed else 0
