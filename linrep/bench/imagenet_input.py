"""Benchmark imagenet-input: the ImageNet training input path on CPU, shards vs ImageFolder.

Both sides read the same fabricated JPEGs (~400x350, the quality picked so a file is ~110 KB, like
ImageNet's typical training image) with the same number of DataLoader worker processes, the same
batch size, and the same crop: RandomResizedCrop to 224 (scale (0.08, 1), ratio (3/4, 4/3), timm's
data-config interpolation, bicubic) and a horizontal flip:
- shards: the project's path, `stream.make_train_loader` over WebDataset shards written by the
  ImageNet converter, with the uint8 crop (`stream.JpegRandomResizedCrop`, colour jitter off to
  match the reference): uint8 crosses from the loader processes and the training process
  normalises each batch (timm's mean/std), as a training run does;
- folder: what timm users run, torchvision `ImageFolder` + `DataLoader` with
  RandomResizedCrop + RandomHorizontalFlip + ToTensor + Normalize in the workers (float32 batches).

Each run is a fresh process (its own peak memory, polled with psutil: the loader workers' RSS and
USS, the training process's RSS); after `warmup` batches, `timed` batches are timed. The two sides
alternate (folder, shards, folder, shards, ...) so load from other work on the machine falls on
both. ratio = shard samples/s / ImageFolder samples/s of runs taken back to back, the median over
the repeats (target >= 1.2); the samples/s figures are medians over every timed window of every
repeat; "per core" divides by the loader processes (each keeps one core busy).
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

from linrep.bench.harness import (BenchContext, BenchResult, make_result, median, ratio_of, register_benchmark,
                                  run_isolated, spread)

NAME = "imagenet-input"
TARGET_BYTES = 110_000  # ImageNet's typical training JPEG
GIB = 2**30


def sizes(quick: bool) -> dict[str, Any]:
    if quick:  # smaller images, one worker, one run a side: well under a minute
        return {"images": 240, "width": 200, "height": 175, "target_bytes": 30_000, "workers": 1, "batch": 16,
                "warmup": 2, "timed": 8, "window": 4, "repeats": 1, "per_shard": 60}
    # 46 batches of 64 fit in one ImageFolder epoch of 3,000 images (a new epoch would restart its workers)
    return {"images": 3000, "width": 400, "height": 350, "target_bytes": TARGET_BYTES, "workers": 2, "batch": 64,
            "warmup": 6, "timed": 40, "window": 8, "repeats": 3, "per_shard": 250}


# ---- the JPEGs ------------------------------------------------------------------------------------
def natural_pixels(rng, width: int, height: int):
    """uint8 [H, W, 3] with a photo's spectrum, roughly: smooth colour fields plus fine texture
    (pure noise would compress far worse than photos, flat fields far better)."""
    import numpy as np

    coarse = rng.uniform(0, 255, size=(height // 16 + 2, width // 16 + 2, 3))
    ys, xs = np.linspace(0, coarse.shape[0] - 1.001, height), np.linspace(0, coarse.shape[1] - 1.001, width)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    smooth = (coarse[y0][:, x0] * (1 - fy) * (1 - fx) + coarse[y0 + 1][:, x0] * fy * (1 - fx)
              + coarse[y0][:, x0 + 1] * (1 - fy) * fx + coarse[y0 + 1][:, x0 + 1] * fy * fx)
    texture = rng.normal(0, 36, size=(height, width, 1))  # luma detail: chroma is subsampled away
    return np.clip(smooth + texture, 0, 255).astype(np.uint8)


def encode(pixels, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def pick_quality(rng, width: int, height: int, target_bytes: int) -> int:
    """The JPEG quality whose files come closest to `target_bytes` (on a few sample images)."""
    samples = [natural_pixels(rng, width, height) for _ in range(3)]
    return min(range(60, 100, 2), key=lambda q: abs(sum(len(encode(p, q)) for p in samples) / 3 - target_bytes))


def fabricate_tree(root: Path, s: dict[str, Any], classes: int = 10, seed: int = 0) -> dict[str, float]:
    """An ImageFolder tree train/<wnid>/*.JPEG (+ a small val/) of `s['images']` JPEGs."""
    import numpy as np

    rng = np.random.default_rng(seed)
    quality = pick_quality(rng, s["width"], s["height"], s["target_bytes"])
    total = 0
    for split, count in (("train", s["images"]), ("val", classes)):
        for i in range(count):
            folder = root / split / f"n{i % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            data = encode(natural_pixels(rng, s["width"], s["height"]), quality)
            (folder / f"{split}_{i:06d}.JPEG").write_bytes(data)
            total += len(data) if split == "train" else 0
    return {"quality": quality, "mean_bytes": total / s["images"]}


def ensure_data(ctx: BenchContext, s: dict[str, Any]) -> tuple[Path, Path, dict[str, float]]:
    """(ImageFolder tree, shard folder, JPEG stats), fabricated and converted once per size."""
    import json

    from trainer.data.convert.imagenet import convert_imagenet

    base = ctx.cache / f"imagenet-input-{s['images']}x{s['width']}x{s['height']}"
    tree, shards, stats_file = base / "tree", base / "shards", base / "jpegs.json"
    if not stats_file.exists():
        ctx.log(NAME, f"fabricating {s['images']} JPEGs of {s['width']}x{s['height']} into {tree}")
        stats = fabricate_tree(tree, s)
        stats_file.write_text(json.dumps(stats))
    if not (shards / "manifest.json").exists():  # written last: its presence means complete
        ctx.log(NAME, f"converting them to shards in {shards} (the project's ImageNet converter)")
        convert_imagenet(tree, shards, samples_per_shard=s["per_shard"], processes=2, classes_from="train",
                         progress=False)
    return tree.resolve(), shards.resolve(), json.loads(stats_file.read_text())


# ---- the two input paths (each in its own process) ---------------------------------------------------
def _timed_batches(batches, warmup: int, timed: int, window: int) -> dict[str, Any]:
    """samples/s of consecutive windows of `window` batches after `warmup` untimed ones, and peak memory."""
    from linrep.bench.streaming import RssSampler

    rates = []
    with RssSampler(every_s=0.25) as rss:
        for _ in range(warmup):  # worker start-up, the shuffle buffer's first fill, first pages touched
            next(batches)
        for _ in range(timed // window):
            t0, samples = time.perf_counter(), 0
            for _ in range(window):
                samples += int(next(batches)["image"].shape[0])
            rates.append(samples / (time.perf_counter() - t0))
    return {"windows": rates, "rss": rss.report()}


def shard_run(shards: str, workers: int, batch: int, warmup: int, timed: int, window: int,
              seed: int) -> dict[str, Any]:
    """The project's path: make_train_loader with the uint8 crop, normalised in this process."""
    from linrep.bench.harness import limit_threads
    from trainer.config import DataConfig
    from trainer.data.imagenet import imagenet_fast_train_transform
    from trainer.data.shards import load_manifest
    from trainer.data.stream import make_train_loader

    limit_threads(1)
    data = DataConfig(dataset="imagenet", labels="imagenet", root=shards, image_size=224, loader_workers=workers,
                      shuffle_buffer=1000)
    transform = imagenet_fast_train_transform(data, color_jitter=0.0)  # the reference has no jitter either
    loader = make_train_loader(data, load_manifest(shards), rank=0, world_size=1, batch_size=batch, seed=seed,
                               epoch=0, num_batches=warmup + timed, transform=transform)
    batches = iter(loader)
    result = _timed_batches(batches, warmup, timed, window)
    for _ in batches:  # let the loader finish its quota and stop its workers
        pass
    return result


def folder_run(tree: str, workers: int, batch: int, warmup: int, timed: int, window: int,
               seed: int) -> dict[str, Any]:
    """What timm users run: ImageFolder + DataLoader, the transform in the workers, float32 batches."""
    import torch
    from torchvision import datasets, transforms as T

    from linrep.bench.harness import limit_threads
    from trainer.data.imagenet import imagenet_data_config

    limit_threads(1)
    config = imagenet_data_config(224)
    transform = T.Compose([T.RandomResizedCrop(224, interpolation=T.InterpolationMode(config["interpolation"])),
                           T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(config["mean"], config["std"])])
    dataset = datasets.ImageFolder(str(Path(tree) / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                         drop_last=True, generator=torch.Generator().manual_seed(seed))
    if len(loader) < warmup + timed:
        raise ValueError(f"{len(dataset)} images make {len(loader)} batches, fewer than {warmup + timed}")
    batches = iter(loader)
    try:
        return _timed_batches(({"image": x} for x, _ in batches), warmup, timed, window)
    finally:
        batches._shutdown_workers()  # now, not at interpreter exit (where a worker thread may abort)


# ---- the benchmark -------------------------------------------------------------------------------
def _memory_figures(prefix: str, rss: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}_loader_worker_peak_rss_gib": rss["loader_process_gib"],
            f"{prefix}_loader_worker_peak_uss_gib": rss["loader_unique_gib"],
            f"{prefix}_train_process_peak_gib": rss["train_process_gib"],
            f"{prefix}_total_peak_gib": rss["worker_total_gib"]}


@register_benchmark(NAME, op=">=", target=1.2,
                    title="ImageNet input samples/s on CPU, shard pipeline (uint8) / ImageFolder + DataLoader")
def bench_imagenet_input(ctx: BenchContext) -> BenchResult:
    s = sizes(ctx.quick)
    tree, shards, jpegs = ensure_data(ctx, s)
    ctx.log(NAME, f"{s['images']} JPEGs of {s['width']}x{s['height']}, quality {jpegs['quality']}, mean "
                  f"{jpegs['mean_bytes'] / 1000:.0f} KB; {s['workers']} loader workers, batch {s['batch']}")
    args = dict(workers=s["workers"], batch=s["batch"], warmup=s["warmup"], timed=s["timed"], window=s["window"])
    runs: dict[str, list[dict[str, Any]]] = {"folder": [], "shards": []}
    for repeat in range(s["repeats"]):  # alternate, first one side then the other: load falls on both
        order = ("folder", "shards") if repeat % 2 == 0 else ("shards", "folder")
        for side in order:
            runs[side].append(run_isolated(folder_run, tree=str(tree), seed=repeat, **args) if side == "folder"
                              else run_isolated(shard_run, shards=str(shards), seed=repeat, **args))
        ctx.log(NAME, f"repeat {repeat + 1}/{s['repeats']}: folder {median(runs['folder'][-1]['windows']):,.0f}, "
                      f"shards {median(runs['shards'][-1]['windows']):,.0f} samples/s (median of its windows)")
    rates = {side: spread(w for r in runs[side] for w in r["windows"]) for side in runs}
    # The ratio pairs runs taken back to back (seconds apart, under the same load from other work on
    # a shared machine) and takes the median of the pairs: load that changes between repeats (2x
    # here with other trainings running) moves both sides of a pair, not the ratio.
    paired = [ratio_of(median(sh["windows"]), median(fo["windows"])) for sh, fo in zip(runs["shards"], runs["folder"])]
    peak = {side: {k: max(r["rss"][k] for r in runs[side]) for k in runs[side][0]["rss"]} for side in runs}
    cores = max(1, min(s["workers"], os.cpu_count() or 1))
    ratio = median(paired)
    figures = {"shards_samples_per_s": rates["shards"]["median"], "folder_samples_per_s": rates["folder"]["median"],
               "shards_samples_per_s_per_core": rates["shards"]["median"] / cores,
               "folder_samples_per_s_per_core": rates["folder"]["median"] / cores,
               **_memory_figures("shards", peak["shards"]), **_memory_figures("folder", peak["folder"]),
               "jpeg_mean_kb": jpegs["mean_bytes"] / 1000, "loader_workers": float(s["workers"])}
    details = {**s, "jpeg_quality": jpegs["quality"], "tree": str(tree), "shards": str(shards),
               "windows_samples_per_s": {side: [[round(w, 1) for w in r["windows"]] for r in runs[side]]
                                         for side in runs},
               "spread": rates, "paired_ratios": [round(r, 3) for r in paired], "cores_counted": cores,
               "memory_note": "loader worker RSS counts pages shared with the forked training process; "
                              "USS is what a worker adds"}
    worst_worker = max(peak["shards"]["loader_process_gib"], peak["folder"]["loader_process_gib"])
    summary = (f"median of {len(paired)} back-to-back pairs; shards {rates['shards']['median']:,.0f} vs ImageFolder "
               f"{rates['folder']['median']:,.0f} samples/s "
               f"({rates['shards']['median'] / cores:,.0f} vs {rates['folder']['median'] / cores:,.0f} per core, "
               f"{s['workers']} loader workers, batch {s['batch']}) on {s['width']}x{s['height']} JPEGs of "
               f"~{jpegs['mean_bytes'] / 1000:.0f} KB; peak RSS per loader worker {peak['shards']['loader_process_gib']:.2f} "
               f"vs {peak['folder']['loader_process_gib']:.2f} GiB (<= 2 GiB: {'yes' if worst_worker <= 2 else 'no'})")
    return make_result(NAME, ratio, summary, figures=figures, details=details)
