"""Benchmark 3, streaming: dSprites MLP training fed from WebDataset shards vs from memory.

Both train the paper's dSprites MLP (`dislib_mlp`, 3 x 512 Linear-BatchNorm-ReLU, head over the
3 shapes) on one thread, batch 1024, with the same engine:
- shards: `ImageTrainData` (trainer/data/images.py) exactly as a Ray Train worker builds it: this
  rank's shards through `stream.make_train_loader` with data.loader_workers=1 (a DataLoader
  process decoding PNGs beside training), shuffle buffer, label scheme;
- memory: a uint8 tensor [N, 1, 64, 64] of the same training images, indexed by a seeded
  permutation and scaled to [0, 1] on the fly (no decoding at all). Its throughput does not
  depend on N, so N is capped (`memory_images`) to keep the benchmark's own memory modest.

Each variant runs in a fresh process, so its peak memory is its own: the training process's peak
RSS (ru_maxrss) and its DataLoader workers' RSS and USS (polled with psutil while training) are
printed; "per worker" means one Ray Train worker = the training process plus its loader
processes, counted as the trainer's RSS plus the loaders' unique pages.
The full run uses the full 737,280-image set, generated once into data/dsprites-full.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from linrep.bench.harness import (BenchContext, BenchResult, make_result, median, ratio_of, register_benchmark,
                                  run_isolated, spread, window_rates)

PRESET = "dislib-dsprites-mlp"
FULL_ROOT = Path("data/dsprites-full")
GIB = 2**30


def sizes(quick: bool) -> dict[str, Any]:
    if quick:
        # 4,800 training images = 18 batches of 256: the run stays inside one epoch like the full one
        return {"limit": 6000, "batch": 256, "steps": 16, "window": 4, "memory_images": 3000}
    return {"limit": None, "batch": 1024, "steps": 70, "window": 10, "memory_images": 60_000}


def ensure_shards(ctx: BenchContext, quick: bool) -> Path:
    """The dSprites shards: the full set under data/dsprites-full (generated once), or a small subset."""
    from trainer.data.convert.dsprites import generate_dsprites

    limit = sizes(quick)["limit"]
    root = ctx.cache / f"dsprites-{limit}" if quick else FULL_ROOT
    if not (root / "manifest.json").exists():  # the manifest is written last: its presence means complete
        ctx.log("streaming", f"generating dSprites shards into {root} (once; minutes for the full set)")
        generate_dsprites(root, limit=limit, processes=2, progress=not quick)
    return root.resolve()


class RssSampler:
    """Polls this process's RSS and its children's (DataLoader workers) in a background thread.

    Children are forked from the training process and share its pages (torch, the model), so
    their RSS double-counts; their USS (pages only they hold) is what they add to the worker.
    """

    def __init__(self, every_s: float = 0.5):
        import psutil

        self.proc = psutil.Process()
        self.every_s = every_s
        self.peak = {"self_rss": 0, "child_rss": 0, "child_uss": 0, "total_rss": 0, "total_uss": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        own = self.proc.memory_info().rss
        rss = uss = 0
        for child in self.proc.children(recursive=True):
            try:
                info = child.memory_full_info()
            except psutil.Error:
                continue
            self.peak["child_rss"] = max(self.peak["child_rss"], info.rss)
            self.peak["child_uss"] = max(self.peak["child_uss"], info.uss)
            rss, uss = rss + info.rss, uss + info.uss
        for key, value in (("self_rss", own), ("total_rss", own + rss), ("total_uss", own + uss)):
            self.peak[key] = max(self.peak[key], value)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                self._sample()
            except psutil.Error:
                pass
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        return False

    def report(self) -> dict[str, float]:
        import resource

        # ru_maxrss is in KiB on Linux: the exact peak of this process (the poll may miss a spike).
        own = max(self.peak["self_rss"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return {"train_process_gib": own / GIB, "loader_process_gib": self.peak["child_rss"] / GIB,
                "loader_unique_gib": self.peak["child_uss"] / GIB,
                "worker_total_gib": max(self.peak["total_uss"], own) / GIB,
                "worker_total_rss_gib": max(self.peak["total_rss"], own) / GIB}


def _engine_and_config(config: dict):
    """The config and the engine of the in-memory run (the same model as the streaming run's, no data source)."""
    import torch

    from trainer.config import from_dict
    from trainer.engine import setup_engine
    from trainer.models import InputSpec, build_classifier

    cfg = from_dict(config)
    torch.manual_seed(cfg.run.seed)
    spec = InputSpec(channels=1, size=cfg.data.image_size)
    model = build_classifier(cfg, spec, 3)
    engine = setup_engine(model, cfg.optim, cfg.run, torch.device("cpu"), 1)
    engine.train()
    return cfg, engine


def stream_throughput(config: dict, steps: int, window: int) -> dict[str, Any]:
    """Training fed by ImageTrainData from the shards (runs in its own process)."""
    import torch

    from linrep.bench.harness import limit_threads
    from trainer.config import from_dict
    from trainer.loop import build_worker, train_step

    limit_threads(1)
    cfg = from_dict(config)
    data, engine = build_worker(cfg, 0, 1, torch.device("cpu"))  # ImageTrainData, as a Ray Train worker
    engine.train()
    batches = data.batches(0)

    def step() -> None:
        x, y = next(batches)
        loss, _ = train_step(engine, x, y, 0.0)
        float(loss)

    with RssSampler() as rss:
        rates = window_rates(step, steps=steps, window=window, samples_per_step=cfg.optim.batch_size)
    return {"windows": rates[1:] or rates, "rss": rss.report(), "num_outputs": data.num_outputs}


def load_images(config: dict, limit: int):
    """The first `limit` training images as uint8 [N, 1, 64, 64] and their shape class [N]."""
    import torch

    from trainer.config import from_dict
    from trainer.data.shards import load_manifest
    from trainer.data.stream import make_eval_loader

    cfg = from_dict(config)
    manifest = load_manifest(cfg.data.root)
    images, labels = [], []
    for batch in make_eval_loader(cfg.data, manifest, "train", batch_size=1024, max_samples=limit):
        images.append((batch["image"] * 255).round().to(torch.uint8))
        labels.append(batch["cls"])
    return torch.cat(images), torch.cat(labels)


def memory_throughput(config: dict, steps: int, window: int, memory_images: int, seed: int = 0) -> dict[str, Any]:
    """Training fed from an in-memory uint8 tensor (runs in its own process)."""
    import torch

    from linrep.bench.harness import limit_threads
    from trainer.loop import train_step

    limit_threads(1)
    cfg, engine = _engine_and_config(config)
    images, labels = load_images(config, memory_images)
    bs = cfg.optim.batch_size
    gen = torch.Generator().manual_seed(seed)
    state = {"perm": torch.randperm(len(images), generator=gen), "pos": 0}

    def next_batch():
        if state["pos"] + bs > len(images):  # a new seeded permutation per pass
            state["perm"], state["pos"] = torch.randperm(len(images), generator=gen), 0
        idx = state["perm"][state["pos"]:state["pos"] + bs]
        state["pos"] += bs
        return images[idx].float().div_(255.0), labels[idx]

    def step() -> None:
        x, y = next_batch()
        loss, _ = train_step(engine, x, y, 0.0)
        float(loss)

    with RssSampler() as rss:
        rates = window_rates(step, steps=steps, window=window, samples_per_step=bs)
    return {"windows": rates[1:] or rates, "rss": rss.report(), "images": len(images)}


@register_benchmark("streaming", op=">=", target=0.9,
                    title="dSprites MLP samples/s, WebDataset shards / in-memory tensor")
def bench_streaming(ctx: BenchContext) -> BenchResult:
    from trainer.config import load_config

    s = sizes(ctx.quick)
    root = ensure_shards(ctx, ctx.quick)
    cfg = load_config(PRESET, [f"data.root={root}", "optim.engine=ddp", "optim.zero_stage=0",
                               f"optim.batch_size={s['batch']}", "data.loader_workers=1", "run.workers=1"])
    from trainer.data.shards import load_manifest

    manifest = load_manifest(root)
    n_train = manifest.split_samples("train")
    args = dict(config=cfg.to_dict(), steps=s["steps"], window=s["window"])
    ctx.log("streaming", f"{manifest.num_samples:,} images ({n_train:,} train) in {root}; in-memory run (before)")
    mem1 = run_isolated(memory_throughput, memory_images=s["memory_images"], **args)
    ctx.log("streaming", f"memory {median(mem1['windows']):,.0f} samples/s; shard-streaming run")
    shards = run_isolated(stream_throughput, **args)
    ctx.log("streaming", f"shards {median(shards['windows']):,.0f} samples/s; in-memory run (after)")
    mem2 = run_isolated(memory_throughput, memory_images=s["memory_images"], **args)
    mem = spread(mem1["windows"] + mem2["windows"])
    stream = spread(shards["windows"])
    ratio = ratio_of(stream["median"], mem["median"])
    rss = shards["rss"]
    figures = {"shards_samples_per_s": stream["median"], "memory_samples_per_s": mem["median"],
               "stream_train_process_peak_gib": rss["train_process_gib"],
               "stream_loader_process_peak_gib": rss["loader_process_gib"],
               "stream_loader_process_unique_peak_gib": rss["loader_unique_gib"],
               "stream_worker_total_peak_gib": rss["worker_total_gib"],
               "stream_worker_total_rss_sum_peak_gib": rss["worker_total_rss_gib"],
               "memory_train_process_peak_gib": max(mem1["rss"]["train_process_gib"], mem2["rss"]["train_process_gib"]),
               "dataset_images": float(manifest.num_samples)}
    details = {"root": str(root), "shards_windows": [round(v, 1) for v in shards["windows"]],
               "memory_windows": [round(v, 1) for v in mem1["windows"] + mem2["windows"]],
               "memory_images": mem1["images"], "train_images": n_train, **s, "loader_workers": 1, "threads": 1,
               "rss_note": "worker_total = training-process RSS + loader USS (forked loaders share the "
                           "trainer's pages, which their RSS counts again)"}
    summary = (f"shards {stream['median']:,.0f} vs memory {mem['median']:,.0f} samples/s on {manifest.num_samples:,} "
               f"images; peak memory per worker {rss['worker_total_gib']:.2f} GiB (training process RSS "
               f"{rss['train_process_gib']:.2f} + loader's own pages {rss['loader_unique_gib']:.2f}; loader RSS "
               f"{rss['loader_process_gib']:.2f} incl. pages shared with the trainer)")
    return make_result("streaming", ratio, summary, figures=figures, details=details)
