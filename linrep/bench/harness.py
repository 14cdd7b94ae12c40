"""The shared harness of `linrep bench`: registry, machine description, timing, results.

A benchmark is a function `run(ctx) -> BenchResult` registered under its name with its target
(`@register_benchmark("overhead", op=">=", target=0.85, ...)`). The harness gives it a context
(output folder, --quick, the tracking store), helpers to time things the same way everywhere
(warm-ups, medians of repeats, windows of a steady state, work in an isolated process), and
turns its result into one JSON file, an MLflow run in experiment `bench`, and the closing line
`<name>: ratio <value> (target <op> <value>)` that can be compared across commits.

Timings on a shared machine are noisy: every result carries the load average before and after,
the machine and the device it was taken on, and (where a benchmark has them) every repeat.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from trainer.errors import RuntimeFault, UserError
from trainer.files import write_json_atomic

BENCH_EXPERIMENT = "bench"          # where bench results are logged
RUNS_EXPERIMENT = "bench-runs"      # where the linrep trainings a benchmark starts are logged
OPS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b}
BENCH_PARAM_CHARS = 500             # machine descriptions are short; longer values are cut


# ---- context and results --------------------------------------------------------------------------
@dataclass
class BenchContext:
    """What every benchmark gets: where to write, how big to run, which store to use."""

    out: Path                       # results folder (JSON per benchmark)
    quick: bool = False             # smoke-test sizes: every benchmark well under a minute
    mlflow: bool = True             # log results to MLflow (experiment `bench`)
    tracking_uri: str | None = None  # the store of bench results and of the trainings benchmarks run
    progress: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr, flush=True))

    @property
    def cache(self) -> Path:
        """Scratch space: shards, Ray storage, logs of subprocesses (reused across runs)."""
        path = self.out / "cache"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def log(self, name: str, msg: str) -> None:
        self.progress(f"[bench {name}] {msg}")


@dataclass
class BenchResult:
    """One benchmark's outcome: the headline ratio against its target, and every figure behind it."""

    name: str
    ratio: float
    op: str
    target: float
    summary: str                                          # one human-readable sentence
    figures: dict[str, float] = field(default_factory=dict)  # absolute numbers (units in their names)
    details: dict[str, Any] = field(default_factory=dict)    # repeats, configs, notes
    machine: dict[str, Any] = field(default_factory=dict)
    load: dict[str, list[float]] = field(default_factory=dict)
    quick: bool = False
    started: str = ""
    wall_s: float = 0.0
    git_commit: str | None = None

    @property
    def met(self) -> bool:
        return bool(math.isfinite(self.ratio) and OPS[self.op](self.ratio, self.target))

    def ratio_line(self) -> str:
        return f"{self.name}: ratio {format_ratio(self.ratio)} (target {self.op} {self.target:g})"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["met"] = self.met
        d["ratio_line"] = self.ratio_line()
        return _finite(d)


def format_ratio(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# ---- registry ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Benchmark:
    name: str
    run: Callable[[BenchContext], BenchResult]
    op: str
    target: float
    title: str


_BENCHMARKS: dict[str, Benchmark] = {}
ORDER = ["identifiability", "overhead", "streaming", "scaling", "probes", "sweep"]


def register_benchmark(name: str, *, op: str, target: float, title: str):
    """Register `run(ctx) -> BenchResult` under `name` with its target (timm's register_model style)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {list(OPS)}")

    def deco(fn: Callable[[BenchContext], BenchResult]):
        _BENCHMARKS[name] = Benchmark(name, fn, op, target, title)
        return fn
    return deco


def list_benchmarks() -> list[str]:
    return sorted(_BENCHMARKS, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def get_benchmark(name: str) -> Benchmark:
    if name not in _BENCHMARKS:
        raise UserError(f"unknown benchmark '{name}' (known: {', '.join(list_benchmarks())})")
    return _BENCHMARKS[name]


def make_result(name: str, ratio: float, summary: str, **kwargs: Any) -> BenchResult:
    """A result with its benchmark's registered target."""
    b = get_benchmark(name)
    return BenchResult(name=name, ratio=float(ratio), op=b.op, target=b.target, summary=summary, **kwargs)


# ---- the machine -----------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> dict[str, Any]:
    """CPU, cores, memory, accelerator and library versions: printed and stored with every result."""
    import torch

    info: dict[str, Any] = {
        "host": platform.node(), "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
        "cpu": cpu_model(), "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "device": "cpu",
    }
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        info["ray"] = None
    if torch.cuda.is_available():
        info["device"] = "cuda"
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def machine_line(m: dict[str, Any]) -> str:
    gpu = f", {m.get('gpu_count', 1)}x {m['gpu']}" if m.get("gpu") else ""
    mem = f", {m['memory_gib']} GiB" if "memory_gib" in m else ""
    return (f"{m['cpu']} ({m['usable_cpus']} usable CPUs{mem}){gpu}; torch {m['torch']}"
            + (f", ray {m['ray']}" if m.get("ray") else ""))


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---- timing helpers --------------------------------------------------------------------------------
def median(values: Iterable[float]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else float("nan")


def spread(values: Iterable[float]) -> dict[str, float]:
    """median, min, max and n of repeats (what every result stores next to its median)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def time_repeats(fn: Callable[[], Any], *, repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def ratio_of(a: float, b: float) -> float:
    return a / b if b and math.isfinite(a) and math.isfinite(b) else float("nan")


# ---- isolated work ---------------------------------------------------------------------------------
def _isolated_entry(queue, fn: Callable, kwargs: dict) -> None:
    try:
        queue.put(("ok", fn(**kwargs)))
    except BaseException as err:  # report anything: the parent turns it into one line
        queue.put(("error", f"{err.__class__.__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}",
                   traceback.format_exc()))


def run_isolated(fn: Callable, /, timeout_s: float = 3600, **kwargs: Any) -> Any:
    """fn(**kwargs) in a fresh spawned process (own threads, own peak RSS, may start its own children).

    `fn` must be a module-level function and its result picklable.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_isolated_entry, args=(queue, fn, kwargs), daemon=False)
    proc.start()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                msg = queue.get(timeout=1.0)
                break
            except Exception:  # queue.Empty: still working, or died
                if not proc.is_alive():
                    raise RuntimeFault(f"isolated benchmark step {fn.__name__} died (exit code {proc.exitcode})") from None
                if time.monotonic() > deadline:
                    raise RuntimeFault(f"isolated benchmark step {fn.__name__} ran past {timeout_s:.0f} s") from None
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=10)
    if msg[0] == "error":
        print(msg[2], file=sys.stderr)
        raise RuntimeFault(f"benchmark step {fn.__name__} failed: {msg[1]}")
    return msg[1]


def limit_threads(threads: int) -> None:
    """Pin torch (and the BLAS libraries of numpy/sklearn) to `threads` in this process."""
    import torch

    torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)
    except ImportError:
        pass


# ---- Ray and MLflow -------------------------------------------------------------------------------
class RaySession:
    """A local Ray for the benchmarks that train through Ray Train (shut down afterwards)."""

    def __enter__(self):
        import ray

        from trainer.run import init_ray

        self.started = not ray.is_initialized()
        init_ray(None)
        return self

    def __exit__(self, *exc):
        import ray

        if self.started and ray.is_initialized():
            ray.shutdown()
        return False


def runs_store(ctx: BenchContext) -> str:
    """The MLflow store of the trainings a benchmark starts (linrep logs to MLflow as users run it).

    With --no-mlflow they go to a scratch store under the cache instead of the user's store.
    """
    from trainer import tracking
    from trainer.config import TrackingConfig

    if ctx.mlflow:
        uri = ctx.tracking_uri or tracking.resolve_uri(TrackingConfig())
    else:
        uri = f"sqlite:///{(ctx.cache / 'mlruns' / 'mlflow.db').resolve()}"
        (ctx.cache / "mlruns").mkdir(parents=True, exist_ok=True)
    tracking.check_reachable(uri)
    tracking.ensure_experiment(uri, RUNS_EXPERIMENT)  # creates (migrates) the store before any timing
    return uri


def run_overrides(ctx: BenchContext, uri: str, label: str) -> list[str]:
    """Config overrides of a benchmark's training: its own store, experiment, storage, a fresh run."""
    return [f"tracking.uri={uri}", f"tracking.experiment={RUNS_EXPERIMENT}", "run.resume=false",
            f"run.storage={(ctx.cache / 'ray_results').resolve()}", f"run.name=bench-{label}"]


def steady_throughput(uri: str, run_id: str, skip: int = 2) -> dict[str, Any]:
    """Median train/samples_per_s of a run after its first `skip` log windows (start-up excluded)."""
    from trainer.tracking import metric_points

    series = metric_points(uri, run_id, "train/samples_per_s")
    values = [v for _, v, _ in series[skip:]] or [v for _, v, _ in series]
    return {**spread(values), "windows": [round(v, 1) for v in values]}


def log_result_to_mlflow(result: BenchResult, json_path: Path, uri: str) -> str:
    """One run in experiment `bench`: params (machine, target), metrics (ratio + figures), the JSON."""
    from trainer import tracking

    exp_id = tracking.ensure_experiment(uri, BENCH_EXPERIMENT)
    tags = {"linrep.bench": result.name, "linrep.git_commit": result.git_commit or "",
            "linrep.bench.met": str(result.met)}
    rid = tracking.create_run(uri, exp_id, f"{result.name}{'-quick' if result.quick else ''}", tags=tags)
    params = {"target": f"{result.op} {result.target:g}", "quick": str(result.quick),
              **{f"machine.{k}": str(v) for k, v in result.machine.items()}}
    tracking.log_params(uri, rid, {k: v[:BENCH_PARAM_CHARS] for k, v in params.items()})
    tracking.log_metrics(uri, rid, {"ratio": result.ratio, **result.figures}, step=0)  # NaN/inf are skipped
    tracking.log_artifact(uri, rid, json_path)
    tracking.set_status(uri, rid, "FINISHED")
    return rid


# ---- writing ---------------------------------------------------------------------------------------
def result_path(out: Path, name: str, machine: dict[str, Any]) -> Path:
    """`<name>.json`, or `<name>.<gpu>.json` for results taken on an accelerator (kept side by side)."""
    if machine.get("gpu"):
        slug = "".join(c if c.isalnum() else "-" for c in machine["gpu"].lower()).strip("-")
        return out / f"{name}.{slug}.json"
    return out / f"{name}.json"


def save_result(result: BenchResult, out: Path) -> Path:
    """Write the result's JSON (atomically) and append it to history.jsonl (comparisons across commits)."""
    path = result_path(out, result.name, result.machine)
    data = result.to_json()
    write_json_atomic(path, data, sort_keys=False)
    with open(out / "history.jsonl", "a") as fh:
        fh.write(json.dumps({k: data[k] for k in ("name", "ratio", "op", "target", "met", "quick", "started",
                                                   "git_commit", "figures", "load")}) + "\n")
    return path


GPU_CHECK = "gpu-check"


def load_gpu_checks(out: Path) -> list[dict[str, Any]]:
    """The `gpu-check[.<gpu>].json` files of `python -m linrep.bench.gpu_check` (unreadable ones skipped)."""
    found = []
    for path in sorted(Path(out).glob(f"{GPU_CHECK}*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("engines") and not data.get("quick"):
            found.append(data)
    return found


def load_results(out: Path) -> list[dict[str, Any]]:
    """Every `<name>.json` / `<name>.<gpu>.json` in a results folder, in benchmark order."""
    found = []
    for path in sorted(Path(out).glob("*.json")):
        if path.name.startswith(GPU_CHECK):
            continue  # the GPU check's own results (linrep/bench/gpu_check.py): see load_gpu_checks
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            raise UserError(f"{path}: not a readable bench result (invalid JSON)") from None
        if not isinstance(data, dict) or "name" not in data or "ratio" not in data:
            raise UserError(f"{path}: not a bench result (no name/ratio)")
        found.append(data)
    rank = {n: i for i, n in enumerate(ORDER)}
    return sorted(found, key=lambda d: (rank.get(d["name"], len(ORDER)), bool(d.get("machine", {}).get("gpu"))))


# ---- throughput of training loops -------------------------------------------------------------------
def window_rates(step: Callable[[], Any], *, steps: int, window: int, samples_per_step: int,
                 sync: Callable[[], None] = lambda: None) -> list[float]:
    """samples/s of consecutive windows of `window` steps (like train/samples_per_s of the loop)."""
    rates = []
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        step()
        if i % window == 0:
            sync()
            t1 = time.perf_counter()
            rates.append(window * samples_per_step / (t1 - t0))
            t0 = t1
    return rates


def ray_train_throughput(ctx: BenchContext, uri: str, source: str, overrides: list[str], label: str,
                         skip: int = 2) -> dict[str, Any]:
    """Train through Ray Train as `linrep train` does (probe actor if enabled) and read its throughput.

    Returns the steady train/samples_per_s (median of log windows after `skip`), the wall time
    between the first and the last logged window (checkpoints included), and the run id.
    """
    from probes.pipeline import train_and_probe
    from trainer.config import load_config
    from trainer.tracking import metric_points

    # these benchmarks measure Ray Train (a worker group, a probe actor): never the in-process path
    cfg = load_config(source, [*run_overrides(ctx, uri, label), "run.in_process=false", *overrides])
    t0 = time.time()
    out = train_and_probe(cfg)
    wall = time.time() - t0
    series = metric_points(uri, out.run_id, "train/samples_per_s")
    tput = steady_throughput(uri, out.run_id, skip=skip)
    first, last = (series[skip] if len(series) > skip else series[0]), series[-1]
    span = last[2] - first[2]
    end_to_end = (last[0] - first[0]) * cfg.optim.batch_size / span if span > 0 else float("nan")
    return {**tput, "end_to_end": end_to_end, "wall_s": wall, "run_id": out.run_id, "final": out.final,
            "workers": cfg.run.workers, "batch_size": cfg.optim.batch_size, "steps": cfg.optim.steps}
