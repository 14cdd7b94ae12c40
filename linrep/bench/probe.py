"""Benchmark 5, probes: the closed-form decoder's speed, and what the probe actor costs training.

- Decoder: `probes.linear.fit_linear` (float64 normal equations, Cholesky) against scikit-learn's
  LinearRegression on the same 100,000 x 512 float32 features and 8 targets, both with an
  intercept and one thread each (as in the probe actor); medians of repeats after a warm-up; the
  two fits' predictions are compared so that speed is not bought with accuracy.
- Actor cost (the ratio): linrep with one Ray Train worker, checkpointing every
  `checkpoint_every` steps in both runs, with the probe actor probing every checkpoint vs with
  probes off. Steady train/samples_per_s from MLflow; the run without probes goes before and after.
"""

from __future__ import annotations

from typing import Any

from linrep.bench.harness import (BenchContext, BenchResult, RaySession, make_result, median, ratio_of,
                                  ray_train_throughput, register_benchmark, run_isolated, runs_store, time_repeats)

PRESET = "synthetic-supervised"


def sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {"n": 10_000, "p": 128, "k": 8, "repeats": 2, "steps": 150, "every": 50, "window": 25}
    return {"n": 100_000, "p": 512, "k": 8, "repeats": 3, "steps": 800, "every": 100, "window": 50}


def decoder_timing(n: int, p: int, k: int, repeats: int, threads: int = 1, seed: int = 0) -> dict[str, Any]:
    """Seconds of fit_linear vs sklearn LinearRegression on the same [n, p] -> [n, k] problem.

    Runs in its own process with `threads` threads for torch and for sklearn's BLAS alike (the
    probe actor runs with one thread; on a busy machine extra BLAS threads only thrash).
    """
    import numpy as np
    import torch
    from sklearn.linear_model import LinearRegression

    from linrep.bench.harness import limit_threads
    from probes.linear import fit_linear

    limit_threads(threads)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, p), dtype=np.float32)
    y = (x @ rng.standard_normal((p, k)).astype(np.float32) + 0.1 * rng.standard_normal((n, k))).astype(np.float32)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    ours = time_repeats(lambda: fit_linear(xt, yt), repeats=repeats)
    sk = time_repeats(lambda: LinearRegression().fit(x, y), repeats=repeats)
    fit = fit_linear(xt, yt)
    ref = LinearRegression().fit(x, y)
    probe_rows = x[:1000]
    diff = float(np.abs(fit.predict(torch.from_numpy(probe_rows)).numpy() - ref.predict(probe_rows)).max())
    return {"ours_s": median(ours), "sklearn_s": median(sk), "ours_repeats": ours, "sklearn_repeats": sk,
            "max_prediction_diff": diff, "threads": torch.get_num_threads()}


@register_benchmark("probes", op=">=", target=0.9,
                    title="training samples/s with the probe actor beside it / without probes")
def bench_probes(ctx: BenchContext) -> BenchResult:
    s = sizes(ctx.quick)
    ctx.log("probes", f"closed-form decoder vs scikit-learn on {s['n']:,} x {s['p']} features")
    dec = run_isolated(decoder_timing, n=s["n"], p=s["p"], k=s["k"], repeats=s["repeats"], threads=1)
    speedup = ratio_of(dec["sklearn_s"], dec["ours_s"])
    ctx.log("probes", f"fit_linear {dec['ours_s']:.3f} s, sklearn {dec['sklearn_s']:.3f} s ({speedup:.1f}x)")
    uri = runs_store(ctx)
    common = ["run.workers=1", "run.cpus_per_worker=1", f"optim.steps={s['steps']}",
              f"optim.warmup_steps={s['steps'] // 10}", f"run.log_every={s['window']}",
              f"run.checkpoint_every={s['every']}", "probe.every=1"]
    if ctx.quick:
        common += ["probe.samples=2048"]
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    with RaySession():
        for mode in ("off", "on", "off"):
            ctx.log("probes", f"1 Ray Train worker, probes {mode}, checkpoint every {s['every']} steps")
            r = ray_train_throughput(ctx, uri, PRESET, [*common, f"probe.enabled={'true' if mode == 'on' else 'false'}"],
                                     f"probes-{mode}")
            runs[mode].append(r)
            ctx.log("probes", f"probes {mode}: {r['median']:,.0f} samples/s")
    off = median([v for r in runs["off"] for v in r["windows"]])
    on = median(runs["on"][0]["windows"])
    ratio = ratio_of(on, off)
    final = runs["on"][0]["final"]
    figures = {"decoder_s": dec["ours_s"], "sklearn_s": dec["sklearn_s"], "decoder_speedup": speedup,
               "decoder_max_prediction_diff": dec["max_prediction_diff"], "train_with_probes_samples_per_s": on,
               "train_without_probes_samples_per_s": off,
               "end_to_end_with_probes_samples_per_s": runs["on"][0]["end_to_end"],
               "end_to_end_without_probes_samples_per_s": median(r["end_to_end"] for r in runs["off"]),
               "probe_seconds": float(final.get("probe/seconds", float("nan")))}
    details = {"decoder": dec, **s, "windows_on": runs["on"][0]["windows"],
               "windows_off": [r["windows"] for r in runs["off"]],
               "run_ids": {k: [r["run_id"] for r in v] for k, v in runs.items()}}
    summary = (f"decoder {dec['ours_s']:.3f} s vs scikit-learn {dec['sklearn_s']:.3f} s on {s['n']:,}x{s['p']} "
               f"({speedup:.1f}x); training {on:,.0f} samples/s with the probe actor vs {off:,.0f} without")
    return make_result("probes", ratio, summary, figures=figures, details=details)
