"""Benchmark 4, scaling: samples/s with 1 and 2 data-parallel workers, and on a GPU when there is one.

The synthetic supervised model at a fixed global batch of 1024 (strong scaling: 2 workers each
sample and train 512 rows and all-reduce their gradients every step). The ratio is the parallel
efficiency of 2 workers, samples/s(2) / (2 x samples/s(1)).

- With Ray installed (this machine): `linrep train` through Ray Train, run.workers = 1 and 2,
  one CPU and one thread each, probe actor off; steady train/samples_per_s from MLflow.
- Without Ray (a lent accelerator machine whose image has no Ray): the same worker code
  (create_train_data(rank, world) -> build_classifier -> setup_engine, i.e. torch DDP over gloo)
  in 1, 2, 4, ... processes started with torch.multiprocessing, up to the machine's cores.
- With CUDA: the plain loop (same data source, model and engine) on one GPU at batch 1024 and at
  larger batches, which is what one GPU worker would do per step.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from linrep.bench.harness import (BenchContext, BenchResult, RaySession, make_result, median, ratio_of,
                                  ray_train_throughput, register_benchmark, run_isolated, runs_store, window_rates)

PRESET = "synthetic-supervised"
TARGET_EFFICIENCY = 0.8


def sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {"steps": 100, "window": 20, "gpu_steps": 60, "gpu_batches": [1024]}
    return {"steps": 600, "window": 50, "gpu_steps": 600, "gpu_batches": [1024, 8192, 65536]}


def has_ray() -> bool:
    """Ray Train importable (LINREP_BENCH_NO_RAY=1 forces the Ray-less path, e.g. to test it)."""
    if os.environ.get("LINREP_BENCH_NO_RAY") == "1":
        return False
    try:
        import ray  # noqa: F401
        import ray.train  # noqa: F401
    except ImportError:
        return False
    return True


# ---- torch DDP without Ray --------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank: int, world: int, port: int, config: dict, steps: int, window: int, queue) -> None:
    import torch
    import torch.distributed as dist

    from linrep.bench.harness import limit_threads
    from trainer.config import from_dict
    from trainer.loop import build_worker, train_step

    limit_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = from_dict(config)
        data, engine = build_worker(cfg, rank, world, torch.device("cpu"))
        engine.train()
        batches = data.batches(0)

        def step() -> None:
            x, y = next(batches)
            loss, _ = train_step(engine, x, y, 0.0)
            float(loss)

        rates = window_rates(step, steps=steps, window=window, samples_per_step=cfg.optim.batch_size)
        if rank == 0:
            queue.put(rates[1:] or rates)
    finally:
        dist.destroy_process_group()


def ddp_throughput(config: dict, world: int, steps: int, window: int) -> list[float]:
    """Global samples/s windows of `world` DDP processes (gloo, one thread each), without Ray."""
    import torch.multiprocessing as tmp

    ctx = tmp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_ddp_rank, args=(r, world, port, config, steps, window, queue)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs) or queue.empty():
        raise RuntimeError(f"DDP run with {world} processes failed (exit codes {[p.exitcode for p in procs]})")
    return queue.get()


# ---- one GPU --------------------------------------------------------------------------------------------
def gpu_throughput(config: dict, batch_sizes: list[int], steps: int) -> dict[str, Any]:
    """The plain loop on cuda:0 at several batch sizes (on-device sampling, same model and engine)."""
    import torch

    from trainer.config import from_dict
    from trainer.loop import build_worker, train_step

    device = torch.device("cuda", 0)
    out: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0)}
    for bs in batch_sizes:
        raw = dict(config)
        raw["optim"] = {**raw["optim"], "batch_size": bs}
        data, engine = build_worker(from_dict(raw), 0, 1, device)
        engine.train()
        batches = data.batches(0)

        def step() -> None:
            x, y = next(batches)
            train_step(engine, x, y, 0.0)

        window = max(10, steps // 10)
        rates = window_rates(step, steps=steps, window=window, samples_per_step=bs, sync=torch.cuda.synchronize)
        out[str(bs)] = {"median": median(rates[1:] or rates), "windows": [round(r, 1) for r in rates]}
    return out


# ---- the benchmark --------------------------------------------------------------------------------------
def _with_ray(ctx: BenchContext, s: dict) -> dict[int, dict]:
    uri = runs_store(ctx)
    results = {}
    with RaySession():
        for workers in (1, 2):
            ctx.log("scaling", f"Ray Train, {workers} worker(s), {s['steps']} steps")
            results[workers] = ray_train_throughput(
                ctx, uri, PRESET, [f"run.workers={workers}", "run.cpus_per_worker=1", "probe.enabled=false",
                                   f"optim.steps={s['steps']}", f"optim.warmup_steps={s['steps'] // 10}",
                                   f"run.log_every={s['window']}",
                                   f"run.checkpoint_every={s['steps']}"], f"scaling-{workers}w")
            ctx.log("scaling", f"{workers} worker(s): {results[workers]['median']:,.0f} samples/s")
    return results


def _without_ray(ctx: BenchContext, s: dict, config: dict) -> dict[int, dict]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    counts = [w for w in (1, 2, 4, 8) if w <= max(2, cores // 2)]
    results = {}
    for workers in counts:
        ctx.log("scaling", f"torch DDP (gloo, no Ray), {workers} process(es), {s['steps']} steps")
        rates = ddp_throughput(config, workers, s["steps"], s["window"])
        results[workers] = {"median": median(rates), "windows": [round(r, 1) for r in rates]}
        ctx.log("scaling", f"{workers} process(es): {results[workers]['median']:,.0f} samples/s")
    return results


@register_benchmark("scaling", op=">=", target=TARGET_EFFICIENCY,
                    title="parallel efficiency of 2 workers, samples/s(2) / (2 x samples/s(1))")
def bench_scaling(ctx: BenchContext) -> BenchResult:
    import torch

    from trainer.config import load_config

    s = sizes(ctx.quick)
    config = load_config(PRESET, ["probe.enabled=false"]).to_dict()
    ray_used = has_ray()
    by_workers = _with_ray(ctx, s) if ray_used else _without_ray(ctx, s, config)
    one, two = by_workers[1]["median"], by_workers.get(2, {}).get("median", float("nan"))
    eff = ratio_of(two, 2 * one)
    figures = {f"samples_per_s_{w}w": r["median"] for w, r in by_workers.items()}
    figures.update({f"efficiency_{w}w": ratio_of(r["median"], w * one) for w, r in by_workers.items() if w > 1})
    details: dict[str, Any] = {"runner": "ray-train" if ray_used else "torch-ddp-gloo", "global_batch": 1024,
                               "windows": {w: r["windows"] for w, r in by_workers.items()}, **s}
    gpu_text = ""
    if torch.cuda.is_available():
        ctx.log("scaling", f"one GPU, plain loop at batch sizes {s['gpu_batches']}")
        gpu = run_isolated(gpu_throughput, config=config, batch_sizes=s["gpu_batches"], steps=s["gpu_steps"])
        details["gpu"] = gpu
        for bs in s["gpu_batches"]:
            figures[f"gpu_samples_per_s_b{bs}"] = gpu[str(bs)]["median"]
        gpu_text = (f"; 1 GPU ({gpu['gpu']}): " + ", ".join(f"{gpu[str(bs)]['median']:,.0f} samples/s at batch {bs}"
                                                            for bs in s["gpu_batches"]))
    runner = "Ray Train workers" if ray_used else "DDP processes (no Ray on this machine)"
    summary = (f"{runner}: " + ", ".join(f"{w}: {r['median']:,.0f} samples/s" for w, r in by_workers.items())
               + f" (global batch 1024); efficiency of 2: {eff:.2f}{gpu_text}")
    return make_result("scaling", eff, summary, figures=figures, details=details)
