"""Benchmark ckpt-storage: the cost of keeping checkpoints in an object store (S3) instead of a
local folder.

The same short training (`linrep train synthetic-supervised`, 1 Ray Train worker, probe actor
off, a checkpoint every few steps so that their cost shows) runs twice in one Ray session, side by
side: run.storage on a local folder, then on s3://BUCKET of a moto server this benchmark starts
on 127.0.0.1 (a free port, its own throwaway credentials, stopped afterwards; no test bed, no
network). The ratio is the wall time of the S3 run over the local one; the figures add the
checkpoint count and size, and the extra seconds per checkpoint that S3 costs.

Order bias: the local run goes first, so the S3 run inherits a warm Ray session (worker processes
cached, imports done); the ratio therefore errs on the low side of the checkpoint cost, which is
why `linrep_startup_s` of both runs is reported too.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

from linrep.bench.harness import (BenchContext, BenchResult, RaySession, make_result, ratio_of,
                                  ray_train_throughput, register_benchmark, runs_store)
from trainer.errors import RuntimeFault
from trainer.run import patched_env

PRESET = "synthetic-supervised"
BUCKET = "linrep-bench"
# Throwaway credentials for the moto server this benchmark starts (moto accepts any); they live
# only in this process's environment while the benchmark runs, never in a config or a log.
MOTO_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def sizes(quick: bool) -> dict[str, int]:
    return {"steps": 60, "checkpoint_every": 10, "log_every": 10} if quick else \
        {"steps": 600, "checkpoint_every": 50, "log_every": 25}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeFault(f"the moto server exited (code {proc.returncode}) before it listened on :{port}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeFault(f"the moto server did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


@contextmanager
def moto_s3(ctx: BenchContext) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 with bucket BUCKET; the AWS_* environment points at it (so the
    local Ray started inside inherits it). Yields the endpoint URL."""
    port = _free_port()
    log = open(ctx.cache / "moto.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_listening(port, proc)
        with patched_env({**MOTO_ENV, "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint}):
            import boto3

            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
            yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _stored(storage: str, run_name: str) -> dict[str, float]:
    """Bytes of one checkpoint, from those the run kept (run.keep_checkpoints) in its storage folder."""
    from trainer.storage import locate

    folders = sorted(locate(storage).subdirs(prefix=run_name), key=lambda loc: loc.name)  # <name>-<time>
    files = folders[-1].files() if folders else {}
    in_ckpt = {name: size for name, size in files.items() if name.startswith("checkpoint_") and "/" in name}
    kept = {name.split("/", 1)[0] for name in in_ckpt}
    total = sum(in_ckpt.values())
    return {"kept": float(len(kept)), "bytes_per_checkpoint": total / max(len(kept), 1)}


def _one_run(ctx: BenchContext, uri: str, storage: str, label: str, s: dict[str, int]) -> dict[str, Any]:
    overrides = ["run.workers=1", "run.cpus_per_worker=1", "probe.enabled=false", f"optim.steps={s['steps']}",
                 f"optim.warmup_steps={max(1, s['steps'] // 10)}", f"run.log_every={s['log_every']}",
                 f"run.checkpoint_every={s['checkpoint_every']}", f"run.storage={storage}"]
    ctx.log("ckpt-storage", f"{label}: {s['steps']} steps, a checkpoint every {s['checkpoint_every']}, "
                            f"run.storage={storage}")
    out = ray_train_throughput(ctx, uri, PRESET, overrides, f"ckpt-{label}", skip=0)
    return {**out, **_stored(storage, f"bench-ckpt-{label}")}


@register_benchmark("ckpt-storage", op="<=", target=1.5,
                    title="wall time of a short training with checkpoints in S3 (moto) / in a local folder")
def bench_ckpt_storage(ctx: BenchContext) -> BenchResult:
    s = sizes(ctx.quick)
    uri = runs_store(ctx)
    local = str((ctx.cache / "ckpt_storage_local").resolve())
    with moto_s3(ctx) as endpoint, RaySession():
        on_disk = _one_run(ctx, uri, local, "local", s)
        on_s3 = _one_run(ctx, uri, f"s3://{BUCKET}/runs", "s3", s)
    ratio = ratio_of(on_s3["wall_s"], on_disk["wall_s"])
    n = -(-s["steps"] // s["checkpoint_every"])  # written (the last step always checkpoints)
    figures = {"local_wall_s": on_disk["wall_s"], "s3_wall_s": on_s3["wall_s"],
               "s3_extra_s_per_checkpoint": (on_s3["wall_s"] - on_disk["wall_s"]) / n,
               "checkpoints": float(n), "checkpoint_bytes_s3": on_s3["bytes_per_checkpoint"],
               "checkpoint_bytes_local": on_disk["bytes_per_checkpoint"], "checkpoints_kept_s3": on_s3["kept"],
               "local_samples_per_s": on_disk["median"], "s3_samples_per_s": on_s3["median"]}
    details = {**s, "endpoint": endpoint, "local_run_id": on_disk["run_id"], "s3_run_id": on_s3["run_id"],
               "batch_size": on_disk["batch_size"], "order": ["local", "s3"]}
    summary = (f"{s['steps']} steps with {n} checkpoints of "
               f"{on_s3['bytes_per_checkpoint'] / 1e6:.2f} MB: S3 (moto, 127.0.0.1) {on_s3['wall_s']:.1f} s vs "
               f"local folder {on_disk['wall_s']:.1f} s")
    return make_result("ckpt-storage", ratio, summary, figures=figures, details=details)
