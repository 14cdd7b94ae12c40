"""The GPU path in one short script: `python -m linrep.bench.gpu_check [--quick] [--out DIR]`.

For a machine with one CUDA GPU (a lent one has 15 minutes in all), so it measures engine paths
directly in one process, without Ray or MLflow (neither needs the GPU; a wheel of Ray is larger
than what can be carried to such a machine):

1. ImageNet-size classifiers through `trainer.engine.setup_engine` exactly as the Ray Train worker
   builds them: timm ResNet-50 under DeepSpeed bf16 + ZeRO-2 and under the torch engine with bf16
   autocast (same batch, side by side), and ViT-B/16 under DeepSpeed bf16 + ZeRO-2. Random
   224x224 images already on the GPU, so the figure is the engine's images/s, not the loader's.
2. A DeepSpeed ZeRO-2 checkpoint written by `write_checkpoint` and the classifier rebuilt from it
   alone by `load_classifier` (what probe actors do): the largest logit difference is reported.
3. The synthetic experiment (`synthetic-supervised` preset: d=5, |C|=100, κ=10) trained on the GPU
   with on-device vMF sampling: seconds until the probe's R² z̃->z first stays >= 0.99 for three
   probes in a row (the identifiability benchmark's criterion), steps/s, final figures.

`--quick` runs tiny sizes on whatever device there is (the CPU here, for the tests). Results go to
`<out>/gpu-check.<gpu>.json` (or `gpu-check.json` on CPU), written atomically.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

STREAK = 3
THRESHOLD = 0.99


def log(message: str) -> None:
    print(f"[gpu-check] {message}", file=sys.stderr, flush=True)


def init_single_process_group(device: torch.device) -> None:
    """A world of one (NCCL on CUDA, gloo on CPU): DeepSpeed runs on the process group it finds."""
    if torch.distributed.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def image_config(encoder: str, engine: str, zero: int, batch: int, size: int, gpu: bool):
    from trainer.config import load_config

    overrides = [f"model.encoder={encoder}", f"optim.engine={engine}", f"optim.zero_stage={zero}",
                 f"optim.batch_size={batch}", "run.workers=1", f"run.use_gpu={str(gpu).lower()}",
                 f"data.image_size={size}", "optim.warmup_steps=1", "optim.steps=1000"]
    if gpu:
        overrides.append("optim.precision=bf16")
    return load_config("imagenet-resnet50", overrides)


def engine_throughput(encoder: str, engine_name: str, zero: int, batch: int, size: int, steps: int,
                      device: torch.device, keep: bool = False, channels_last: bool | None = None) -> dict[str, Any]:
    """images/s of train_step on random images already on the device (median of 3 timed windows)."""
    from trainer.engine import setup_engine
    from trainer.loop import train_step
    from trainer.models import InputSpec, build_classifier

    cfg = image_config(encoder, engine_name, zero, batch, size, device.type == "cuda")
    torch.manual_seed(0)
    spec = InputSpec(channels=3, size=size)
    num_outputs = 1000
    engine = setup_engine(build_classifier(cfg, spec, num_outputs), cfg.optim, cfg.run, device, 1,
                          channels_last=channels_last)
    engine.train()
    x = torch.rand(batch, 3, size, size, device=device)  # [B,3,H,W]
    y = torch.randint(0, num_outputs, (batch,), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(max(2, steps // 4)):  # warm-up: cuDNN autotuning, allocator, DeepSpeed buckets
        loss, _ = train_step(engine, x, y, 0.0)
    sync()
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(steps):
            loss, _ = train_step(engine, x, y, 0.0)
        sync()
        rates.append(steps * batch / (time.perf_counter() - t0))
    out = {"encoder": encoder, "engine": engine_name, "zero_stage": zero if engine_name == "deepspeed" else None,
           "precision": "bf16" if device.type == "cuda" else "fp32", "batch": batch, "image_size": size,
           "channels_last": engine.channels_last,
           "images_per_s": sorted(rates)[1], "windows": [round(r, 1) for r in rates], "loss": float(loss),
           "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    log(f"{encoder} {engine_name}{f' ZeRO-{zero}' if engine_name == 'deepspeed' else ''} {out['precision']} "
        f"{'NHWC' if engine.channels_last else 'NCHW'} batch {batch}: {out['images_per_s']:,.0f} images/s")
    if keep:
        out["_parts"] = (cfg, spec, num_outputs, engine, x)
    return out


def checkpoint_roundtrip(parts, device: torch.device) -> dict[str, Any]:
    """DeepSpeed checkpoint -> classifier rebuilt from the folder alone; largest logit difference."""
    from trainer.checkpoint import is_complete, load_classifier, make_meta, write_checkpoint

    cfg, spec, num_outputs, engine, x = parts
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "checkpoint_000001"
        t0 = time.perf_counter()
        write_checkpoint(engine, cfg, make_meta(1, x.shape[0], num_outputs, spec), directory)
        save_s = time.perf_counter() - t0
        model, _, meta = load_classifier(directory, device)
        engine.train(False)
        with torch.no_grad():
            xs = x[:16]
            reference = engine.module.float()(xs) if device.type == "cuda" else engine.module(xs)
            rebuilt = model(xs)
        diff = float((reference.float() - rebuilt.float()).abs().max())
        scale = float(reference.float().abs().max())
        out = {"complete": is_complete(directory), "save_s": save_s, "max_logit_diff": diff,
               "max_logit": scale, "step": int(meta["step"])}
    log(f"checkpoint round trip: complete={out['complete']}, max |logit diff| {diff:.2e} (logits up to {scale:.2f})")
    return out


def synthetic_identifiability(device: torch.device, quick: bool, max_s: float) -> dict[str, Any]:
    """The synthetic experiment on the device: time until R² z̃->z >= 0.99 for three probes running."""
    from probes.synthetic import synthetic_figures
    from trainer.config import load_config
    from trainer.loop import build_worker, train_step

    overrides = [f"run.use_gpu={str(device.type == 'cuda').lower()}"]
    if quick:
        overrides += ["model.hidden=[32,32]", "data.generator_pool=500", "probe.samples=1024", "optim.steps=60",
                      "optim.warmup_steps=5"]
    cfg = load_config("synthetic-supervised", overrides)
    probe_every = 20 if quick else 250
    threshold = 0.5 if quick else THRESHOLD
    t_start = time.perf_counter()
    data, engine = build_worker(cfg, 0, 1, device)
    batches = data.batches(0)
    probes: list[tuple[int, float, float]] = []
    reached = None
    figures: dict[str, float] = {}
    step = 0
    for step in range(1, cfg.optim.steps + 1):
        engine.train()
        x, y = next(batches)
        train_step(engine, x, y, cfg.optim.label_smoothing)
        if step % probe_every and step != cfg.optim.steps:
            continue
        figures = synthetic_figures(engine.module, cfg)
        probes.append((step, figures["probe/r2_affine"], time.perf_counter() - t_start))
        tail = probes[-STREAK:]
        if reached is None and len(tail) == STREAK and all(r >= threshold for _, r, _ in tail):
            reached = tail[0]
            log(f"synthetic: R² z̃->z >= {threshold} from step {reached[0]} ({reached[2]:.1f} s after start)")
        if reached and step >= reached[0] + probe_every * (STREAK - 1) + 1000 or time.perf_counter() - t_start > max_s:
            break  # a little past the streak, so the final figures show where it settles
    elapsed = time.perf_counter() - t_start
    out = {"preset": "synthetic-supervised", "steps": step, "seconds": elapsed, "steps_per_s": step / elapsed,
           "batch": cfg.optim.batch_size, "threshold": threshold, "reached_step": reached and reached[0],
           "reached_s": reached and reached[2], "final": figures,
           "probes": [(s, round(r, 5), round(t, 2)) for s, r, t in probes]}
    log(f"synthetic: {step} steps in {elapsed:.1f} s ({out['steps_per_s']:.0f} steps/s), final R² "
        f"{figures.get('probe/r2_affine', float('nan')):.4f}")
    return out


def run_checks(quick: bool, out_dir: Path, synthetic_max_s: float) -> dict[str, Any]:
    from linrep.bench.harness import describe_machine, result_path
    from trainer.files import write_json_atomic

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    init_single_process_group(device)
    machine = describe_machine()
    log(f"device {machine.get('gpu', 'cpu')}; torch {torch.__version__}")
    size, steps = (32, 2) if quick else (224, 20)
    small = "resnet10t" if quick else "resnet50"
    vit = "vit_tiny_patch16_224" if quick else "vit_base_patch16_224"
    batch = 4 if quick else 256
    result: dict[str, Any] = {"name": "gpu-check", "quick": quick, "machine": machine, "engines": []}
    ds = engine_throughput(small, "deepspeed", 2, batch, size, steps, device, keep=True)
    parts = ds.pop("_parts")
    result["checkpoint"] = checkpoint_roundtrip(parts, device)
    del parts
    result["engines"].append(ds)
    result["engines"].append(engine_throughput(small, "deepspeed", 2, batch, size, steps, device,
                                               channels_last=not ds["channels_last"]))
    ddp = engine_throughput(small, "ddp", 0, batch, size, steps, device)  # NHWC on CUDA (wants_channels_last)
    result["engines"].append(ddp)
    # the torch engine in the other memory layout, for the ratio of the engine's choice
    result["engines"].append(engine_throughput(small, "ddp", 0, batch, size, steps, device,
                                               channels_last=not ddp["channels_last"]))
    result["engines"].append(engine_throughput(vit, "deepspeed", 2, batch, size, steps, device))
    result["synthetic"] = synthetic_identifiability(device, quick, synthetic_max_s)
    path = result_path(out_dir, "gpu-check", machine)
    write_json_atomic(path, result, sort_keys=False)
    log(f"wrote {path}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m linrep.bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (runs on a CPU too)")
    parser.add_argument("--out", default="results/bench", help="folder for gpu-check[.<gpu>].json")
    parser.add_argument("--synthetic-max-s", type=float, default=240.0,
                        help="stop the synthetic run after this many seconds")
    args = parser.parse_args(argv)
    result = run_checks(args.quick, Path(args.out), args.synthetic_max_s)
    ds, ds_other, ddp, ddp_other = result["engines"][:4]

    def layouts(a: dict, b: dict) -> str:
        return (f"{'NHWC' if a['channels_last'] else 'NCHW'} / {'NHWC' if b['channels_last'] else 'NCHW'} "
                f"{a['images_per_s'] / b['images_per_s']:.3f}")

    print(f"gpu-check: DeepSpeed ZeRO-2 / torch engine images/s {ds['images_per_s'] / ddp['images_per_s']:.3f}; "
          f"DeepSpeed {layouts(ds, ds_other)}; torch engine {layouts(ddp, ddp_other)}; "
          f"synthetic R² >= {result['synthetic']['threshold']} after {result['synthetic']['reached_s'] or float('nan'):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
