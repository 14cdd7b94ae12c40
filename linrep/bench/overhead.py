"""Benchmark 2, Ray Train overhead: linrep with one Ray Train worker over the plain loop.

Both train the synthetic supervised model (`build_classifier`, batch 1024) on one thread with the
same on-device sampling (`create_train_data`) and the same engine; the plain loop is one process
with no Ray, no MLflow and no checkpoints. linrep is `linrep train` with run.workers=1,
run.cpus_per_worker=1 and the probe actor off (its cost is benchmark `probes`); its figure is the
steady-state train/samples_per_s it logged to MLflow (first windows, i.e. start-up, excluded).

The plain loop runs before and after the Ray run and the median over both is the reference, so a
change of the machine's load during the Ray run biases the ratio less.
"""

from __future__ import annotations

from typing import Any

from linrep.bench.harness import (BenchContext, BenchResult, RaySession, make_result, median, ratio_of,
                                  ray_train_throughput, register_benchmark, run_isolated, runs_store, spread,
                                  window_rates)

PRESET = "synthetic-supervised"


def plain_loop_throughput(config: dict, steps: int, window: int, threads: int) -> dict[str, Any]:
    """samples/s windows of the plain single-process loop (runs in its own process)."""
    import torch

    from linrep.bench.harness import limit_threads
    from trainer.config import from_dict
    from trainer.loop import build_worker, train_step

    limit_threads(threads)
    cfg = from_dict(config)
    data, engine = build_worker(cfg, 0, 1, torch.device("cpu"))
    engine.train()
    batches = data.batches(0)

    def step() -> None:
        x, y = next(batches)
        loss, acc = train_step(engine, x, y, cfg.optim.label_smoothing)
        float(loss), float(acc)  # what the Ray loop does every step

    rates = window_rates(step, steps=steps, window=window, samples_per_step=cfg.optim.batch_size)
    return {"windows": rates[1:] or rates}  # the first window holds the warm-up


def sizes(quick: bool) -> dict[str, int]:
    return {"plain_steps": 120, "ray_steps": 200, "window": 20} if quick else \
        {"plain_steps": 500, "ray_steps": 1200, "window": 50}


@register_benchmark("overhead", op=">=", target=0.85,
                    title="samples/s, 1 Ray Train worker / plain single-process loop")
def bench_overhead(ctx: BenchContext) -> BenchResult:
    from trainer.config import load_config

    s = sizes(ctx.quick)
    uri = runs_store(ctx)
    overrides = ["run.workers=1", "run.cpus_per_worker=1", "probe.enabled=false", f"optim.steps={s['ray_steps']}",
                 f"optim.warmup_steps={s['ray_steps'] // 10}",
                 f"run.log_every={s['window']}", f"run.checkpoint_every={s['ray_steps']}"]
    cfg = load_config(PRESET, overrides)
    plain_args = dict(config=cfg.to_dict(), steps=s["plain_steps"], window=s["window"], threads=1)
    ctx.log("overhead", f"plain loop, {s['plain_steps']} steps (before)")
    before = run_isolated(plain_loop_throughput, **plain_args)["windows"]
    ctx.log("overhead", f"plain median {median(before):,.0f} samples/s; linrep with 1 Ray Train worker, "
                        f"{s['ray_steps']} steps")
    with RaySession():
        ray = ray_train_throughput(ctx, uri, PRESET, overrides, "overhead")
    ctx.log("overhead", f"linrep median {ray['median']:,.0f} samples/s; plain loop again (after)")
    after = run_isolated(plain_loop_throughput, **plain_args)["windows"]
    plain = spread(before + after)
    ratio = ratio_of(ray["median"], plain["median"])
    figures = {"linrep_samples_per_s": ray["median"], "plain_samples_per_s": plain["median"],
               "plain_before_samples_per_s": median(before), "plain_after_samples_per_s": median(after),
               "linrep_end_to_end_samples_per_s": ray["end_to_end"], "linrep_wall_s": ray["wall_s"]}
    details = {"linrep_windows": ray["windows"], "plain_windows_before": [round(v, 1) for v in before],
               "plain_windows_after": [round(v, 1) for v in after], "linrep_run_id": ray["run_id"], **s,
               "batch_size": cfg.optim.batch_size, "threads": 1}
    summary = (f"1 Ray Train worker {ray['median']:,.0f} samples/s vs plain loop {plain['median']:,.0f} samples/s "
               f"(batch {cfg.optim.batch_size}, 1 thread each)")
    return make_result("overhead", ratio, summary, figures=figures, details=details)
