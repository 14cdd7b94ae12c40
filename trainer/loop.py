"""The Ray Train worker function: build -> train -> close.

`train_loop_per_worker` is what TorchTrainer runs on every worker. It rebuilds the config from
plain data, builds data source, model and engine (`build_worker`, also used by the benchmarks'
plain loops), restores the latest checkpoint if Ray hands one
over, and runs `train`, which calls `train_step` and, every run.checkpoint_every steps, saves a
self-describing checkpoint, reports it to Ray Train and hands its path to the probe actor.

The same `run_worker` also runs in the calling process (`InProcessSession`): a sweep's trial of
one CPU worker trains inside its Tune trial process instead of starting a Ray Train controller and
worker group for seconds of steps (tune/sweep.py). The session is the only difference: who
persists a checkpoint into the run folder and where the reported metrics go.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from trainer.checkpoint import META_FILE, is_complete, list_checkpoints, make_meta, prune_checkpoints, read_meta, write_checkpoint
from trainer.config import Config, from_dict
from trainer.data.sources import TrainData, create_train_data
from trainer.engine import rank0_decides, setup_engine
from trainer.models import build_classifier
from trainer.progress import emit
from trainer.storage import Location, locate
from trainer.tracking import MetricLogger, start_system_metrics


@dataclass
class LoopContext:
    """What the driver hands every worker besides the config."""

    run_dir: str                 # this run's storage folder: absolute path or URI (checkpoint_* live here)
    tracking_uri: str | None     # None: no MLflow logging
    run_id: str | None
    probes: Any = None           # the run's probes (submit(path, step), latest(): probes.actor.ActorProbes or
                                 # LocalProbe), or None
    extra: dict = field(default_factory=dict)


class RayTrainSession:
    """A Ray Train worker's session: its rank, Ray persisting each reported checkpoint into the run
    folder (storage/name/checkpoint_dir_name), and the checkpoint Ray hands over on a restart."""

    def __init__(self):
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()

    def report(self, metrics: dict[str, float], checkpoint: Path | None, dir_name: str) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint) if checkpoint else None,
                         checkpoint_dir_name=dir_name)

    def fallback_checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def stopping(self) -> bool:
        return False  # Ray Train stops its workers itself (controller abort)


class StopRequested(Exception):
    """Raised in the training loop when the process hosting an in-process run asked it to stop."""


class InProcessSession:
    """One worker training in the calling process (no Ray Train): the session persists each
    checkpoint into the run folder itself, every file first and meta.json last (so a folder cut
    short is never taken as complete), and hands each report's metrics to `on_report`.

    stop: set by another thread (a Tune trial being stopped); the loop ends at its next step."""

    rank, world = 0, 1

    def __init__(self, run_dir: str, on_report: Callable[[dict], None] | None = None,
                 stop: threading.Event | None = None):
        self.run_dir = locate(run_dir)
        self.on_report = on_report
        self.stop = stop or threading.Event()
        self.last_metrics: dict[str, float] = {}
        self.last_checkpoint: str | None = None

    def report(self, metrics: dict[str, float], checkpoint: Path | None, dir_name: str) -> None:
        if checkpoint is not None:
            target = self.run_dir / dir_name
            persist_checkpoint(Path(checkpoint), target)
            self.last_checkpoint = str(target)
        self.last_metrics = dict(metrics)
        if self.on_report:
            self.on_report(dict(metrics))

    def fallback_checkpoint(self):
        return None

    def stopping(self) -> bool:
        return self.stop.is_set()


def persist_checkpoint(local: Path, target: Location) -> None:
    """Move a checkpoint written in the scratch folder `local` into `target` (a folder or URI): a
    leftover of a crash at the same step is replaced, and meta.json goes last, so a copy cut short
    is never taken as complete (checkpoint.is_complete). `local` loses its meta.json."""
    meta = (local / META_FILE).read_bytes()
    (local / META_FILE).unlink()
    target.delete_dir()
    target.upload(local)
    target.child(META_FILE).write_bytes(meta)


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def train_step(engine, x: torch.Tensor, y: torch.Tensor, label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on a batch: (loss, accuracy) as detached scalars."""
    logits = engine.forward(x)                                   # [B, K]
    loss = F.cross_entropy(logits, y, label_smoothing=0.0 if y.ndim == 2 else label_smoothing)
    engine.backward(loss)
    engine.step()
    hard = y.argmax(-1) if y.ndim == 2 else y  # soft (mixup) targets: their argmax
    acc = (logits.detach().argmax(-1) == hard).float().mean()
    return loss.detach(), acc


def restore(engine, run_dir: str | Path | Location, session: Any = None) -> int:
    """Load the newest complete checkpoint; return its step (0 for a fresh run).

    The run folder (local or a URI) is scanned first: a driver killed right after a checkpoint
    was persisted may not have recorded it in Ray's snapshot, and an incomplete folder (crash
    mid-save, or a pruned one) is never taken. A remote checkpoint is downloaded to a local
    temporary folder and loaded from there. The session's checkpoint (Ray's own latest) is the
    fallback.
    """
    complete = list_checkpoints(locate(run_dir))
    if complete:
        with complete[-1].local_copy() as local:
            engine.load(local)
            return read_meta(local)["step"]
    ckpt = session.fallback_checkpoint() if session is not None else None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            if is_complete(Path(d)):
                engine.load(Path(d))
                return read_meta(Path(d))["step"]
    return 0


def save_and_report(engine, cfg: Config, data: TrainData, step: int, metrics: dict[str, float],
                    ctx: LoopContext, session: Any, logger: MetricLogger | None) -> bool:
    """Checkpoint -> flush metrics -> report (a barrier on every rank) -> hand the path to the probe.
    True on rank 0 when the checkpoint went to the probe.

    The reported metrics carry the latest probe figures available (from an earlier checkpoint,
    with `probe_step`), so schedulers such as ASHA can rank trials by them.
    """
    rank = session.rank
    with tempfile.TemporaryDirectory(prefix="linrep-ckpt-") as tmp:
        meta = make_meta(step, step * cfg.optim.batch_size, data.num_outputs, data.spec)
        write_checkpoint(engine, cfg, meta, Path(tmp))
        if logger:
            logger.flush()  # before report: a resumed run then skips exactly what is already stored
        has_files = any(Path(tmp).iterdir())
        session.report({**metrics, "step": step}, Path(tmp) if has_files else None, checkpoint_dir_name(step))
    nth = step // cfg.run.checkpoint_every
    if rank == 0 and ctx.probes is not None and (nth % cfg.probe.every == 0 or step == cfg.optim.steps):
        ctx.probes.submit(str(locate(ctx.run_dir) / checkpoint_dir_name(step)), step)
        return True
    if rank == 0 and ctx.probes is None:
        retain_without_probes(ctx, cfg)
    return False


def retain_without_probes(ctx: LoopContext, cfg: Config) -> None:
    """run.keep_checkpoints when no probe actor applies it (probe.enabled=false): the latest K, once
    the report has persisted the newest (without this, a bench run with keep 3 kept all 6)."""
    try:
        prune_checkpoints(ctx.run_dir, cfg.run.keep_checkpoints)
    except OSError as err:
        print(f"warning: checkpoint retention failed: {err}", file=sys.stderr, flush=True)


class Progress:
    """Rank 0's progress events: step, loss, accuracy, throughput and the latest probe figure."""

    def __init__(self, cfg: Config, probes: Any, run: str = ""):
        self.total = cfg.optim.steps
        self.run = run  # the run folder's name: a sweep's table has one row per run
        self.probes = probes
        self.latest: dict[str, float] = {}

    def poll_latest(self) -> dict[str, float]:
        self._poll_probe()
        return self.latest

    def wait_for_probe(self, timeout_s: float, stopping: Callable[[], bool]) -> dict[str, float]:
        """run.stop_wait: the figures once the checkpoint just submitted has been probed."""
        self.latest = self.probes.wait(timeout_s, stopping) or self.latest
        return self.latest

    def _poll_probe(self) -> None:
        if self.probes is not None:  # never waits: the figures known so far when the answer is not in
            self.latest = self.probes.latest() or self.latest

    def line(self, step: int, m: dict[str, float]) -> None:
        """One step event for the driver's display (trainer/progress.py renders it)."""
        self._poll_probe()
        event = {"run": self.run, "step": step, "total": self.total, "loss": m["train/loss"], "acc": m["train/acc"],
                 "samples_per_s": m["train/samples_per_s"]}
        key = next((k for k in ("probe/r2_affine", "val/acc") if k in self.latest), None)
        if key:  # the latest probe figure, from the checkpoint it was computed on
            event.update(probe_key=key, probe=self.latest[key], probe_step=int(self.latest.get("step", 0)))
        emit("step", **event)


def stop_reached(stop_at: dict[str, float], figures: dict[str, float]) -> str:
    """'val/acc 0.9993 >= 0.999, ...' when the figures reach every threshold of run.stop_at, else ''."""
    if not figures or any(figures.get(k, float("-inf")) < v for k, v in stop_at.items()):
        return ""
    return ", ".join(f"{k} {figures[k]:.4g} >= {v:g}" for k, v in stop_at.items())


# The other ranks wait for rank 0 inside rank0_decides' broadcast, which fails past the process group's
# timeout (Ray's TorchConfig.timeout_s, 1800 s): a multi-worker run waits for a probe at most this long.
MULTI_WORKER_PROBE_WAIT_S = 1500.0


def wait_for_probe(progress: Progress, cfg: Config, session: Any, step: int, logger: MetricLogger | None
                   ) -> dict[str, float]:
    """run.stop_wait, rank 0: pause training until the probe of `step` has answered, so run.stop_at
    is applied to this checkpoint; the wait is logged as train/probe_wait_s."""
    timeout_s = cfg.probe.drain_timeout_s
    if session.world > 1:
        timeout_s = min(timeout_s, MULTI_WORKER_PROBE_WAIT_S)
    t0 = time.perf_counter()
    latest = progress.wait_for_probe(timeout_s, session.stopping)
    waited = time.perf_counter() - t0
    if int(latest.get("step", -1)) < step and not session.stopping():
        print(f"warning: run.stop_wait: the probe of step {step} gave no figures (it failed, or is still running "
              f"after {waited:.0f} s); training goes on", file=sys.stderr, flush=True)
    if logger:
        logger.log({"train/probe_wait_s": waited}, step)
    return latest


def train(cfg: Config, engine, data: TrainData, start_step: int, ctx: LoopContext, session: Any,
          logger: MetricLogger | None) -> None:
    run, optim, rank = cfg.run, cfg.optim, session.rank
    progress = Progress(cfg, ctx.probes, locate(ctx.run_dir).name) if rank == 0 else None
    engine.train()
    loss_sum = acc_sum = 0.0
    n_since = 0
    t0 = time.perf_counter()
    batches = data.batches(start_step * optim.grad_accum)
    for step in range(start_step, optim.steps):
        for _ in range(optim.grad_accum):
            x, y = next(batches)
            loss, acc = train_step(engine, x, y, optim.label_smoothing)
        if session.stopping():
            raise StopRequested(f"stopped at step {step + 1}")
        loss_sum += float(loss)
        acc_sum += float(acc)
        n_since += 1
        done = step + 1
        is_ckpt = done % run.checkpoint_every == 0 or done == optim.steps
        if done % run.log_every == 0 or is_ckpt:
            elapsed = time.perf_counter() - t0
            metrics = {"train/loss": loss_sum / n_since, "train/acc": acc_sum / n_since,
                       "train/samples_per_s": n_since * optim.batch_size / max(elapsed, 1e-9),
                       "train/lr": engine.lr, "train/temperature": engine.module.temperature,
                       **data.stats()}
            if logger:
                logger.log(metrics, done)
            if progress:
                progress.line(done, metrics)
            loss_sum = acc_sum = 0.0
            n_since = 0
            t0 = time.perf_counter()
        if is_ckpt:
            latest = progress.poll_latest() if progress else {}
            report = {"train/loss": float(loss), **{k: v for k, v in latest.items() if k.startswith("probe/")}}
            if latest:
                report["probe_step"] = int(latest.get("step", 0))
            probed = save_and_report(engine, cfg, data, done, report, ctx, session, logger)
            if run.stop_wait and probed and progress:
                latest = wait_for_probe(progress, cfg, session, done, logger)
            reached = stop_reached(run.stop_at, latest) if run.stop_at else ""
            if run.stop_at and rank0_decides(bool(reached), engine.device):
                if rank == 0:
                    emit("note", text=f"stopping at step {done}: the probe of step {int(latest.get('step', 0))} "
                                      f"reached {reached} (run.stop_at)")
                    if logger:
                        logger.log({"train/stop_reached_step": float(latest.get("step", 0))}, done)
                break
            t0 = time.perf_counter()  # checkpoint time is not training throughput


def build_worker(cfg: Config, rank: int, world: int, device: torch.device) -> tuple[TrainData, Any]:
    """A worker's build phase: this rank's data source, then the model and its engine.

    The seed is set first, so every rank starts from identical weights (and a benchmark's plain
    loop from the weights a Ray Train worker would have)."""
    torch.manual_seed(cfg.run.seed)
    data = create_train_data(cfg, rank, world, device)
    model = build_classifier(cfg, data.spec, data.num_outputs)
    engine = setup_engine(model, cfg.optim, cfg.run, device, world)
    return data, engine


def train_loop_per_worker(loop_config: dict) -> None:
    """Entry point of every Ray Train worker: build, train, close."""
    cfg = from_dict(loop_config["config"])
    session = RayTrainSession()
    if cfg.run.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    run_worker(cfg, loop_config["ctx"], session, device)


def run_worker(cfg: Config, ctx: LoopContext, session: Any, device: torch.device) -> None:
    """Build, restore, train, close: one worker of a run, under a Ray Train or in-process session."""
    rank, world = session.rank, session.world
    if device.type == "cpu":
        torch.set_num_threads(cfg.run.threads_per_worker or max(1, round(cfg.run.cpus_per_worker)))
    data, engine = build_worker(cfg, rank, world, device)
    start_step = restore(engine, ctx.run_dir, session)
    logger = None
    if rank == 0 and ctx.tracking_uri and ctx.run_id:
        # background: a hung server never stalls a step; close waits out a restart at the run's end
        logger = MetricLogger(ctx.tracking_uri, ctx.run_id, background=True,
                              close_timeout_s=cfg.tracking.outage_wait_s)
        if start_step:
            logger.resume_from(["train/loss", "train/acc", "train/samples_per_s", "train/lr",
                                "train/temperature", *data.stats().keys()])
            emit("note", text=f"resumed from step {start_step}")
    system = (start_system_metrics(ctx.tracking_uri, ctx.run_id, cfg.tracking.system_metrics_s)
              if logger and cfg.tracking.system_metrics_s > 0 else None)  # CPU, memory, GPU: rank 0's node
    try:
        train(cfg, engine, data, start_step, ctx, session, logger)
    finally:
        if system:
            system.stop()
        if logger:
            logger.close(retries=None)  # until written or tracking.outage_wait_s has passed
        sys.stdout.flush()
