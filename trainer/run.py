"""The driver: a validated config -> a Ray Train job -> checkpoints + one MLflow run.

`prepare_run` names the run, opens (or reuses) its MLflow run and fixes its storage folder;
`fit` starts or joins Ray and runs the TorchTrainer. Callers that attach a probe actor (probes/)
create it between the two. Rerunning the same config reuses the run name, so Ray Train resumes
from the latest checkpoint and the MLflow run is reused.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

from trainer import cluster
from trainer.config import Config, RunConfig
from trainer.errors import UserError
from trainer.loop import InProcessSession, LoopContext, StopRequested, run_worker, train_loop_per_worker
from trainer.storage import Location, contained, locate
from trainer.safe_load import check_resume_checkpoint
from trainer import progress, tracking
from trainer.ray_private import bound_torch_config, use_single_machine_mode


# On a cluster the default ./ray_results would land in a job's temporary working directory:
# LINREP_STORAGE (shared storage, e.g. /mnt/shared/linrep) replaces the default there.
DEFAULT_STORAGE = RunConfig.model_fields["storage"].default
PROBE_WEIGHTS_TAG = "linrep.probe_weights"
LOOPBACK = "127.0.0.1"  # a local Ray's node address: nothing it starts listens elsewhere


@dataclass
class RunHandle:
    cfg: Config
    run_key: str
    run_dir: Location            # local folder or URI (trainer.storage); str() is what users see
    tracking_uri: str | None
    run_id: str | None


@dataclass
class RunResult:
    handle: RunHandle
    metrics: dict[str, Any]
    checkpoint_path: str | None
    error: str | None = None


def preflight(cfg: Config) -> None:
    """Checks that need files, before Ray starts: the shard folder, its manifest, the label scheme,
    samples in the splits the run reads, and every training shard's sha256 and samples (cached after
    the first pass, trainer/data/integrity.py). A bad shard is bad input here: one line, exit 2."""
    if cfg.is_synthetic:
        return
    from trainer.data.integrity import require_samples, verified
    from trainer.data.labels import create_label_scheme
    from trainer.data.shards import load_manifest
    from trainer.errors import RuntimeFault

    manifest = load_manifest(cfg.data.root)
    create_label_scheme(cfg.data, manifest, cfg.data_seed)
    if "val" not in manifest.splits:
        raise UserError(f"data.root={cfg.data.root}: the manifest has no 'val' split for probes and val/acc")
    if cfg.probe.enabled:
        require_samples(manifest, "val")
    try:
        verified(manifest, "train", cfg.data.on_error)
    except RuntimeFault as err:  # met before anything runs: the input is bad, not the run
        raise UserError(str(err)) from None


def absolute_data_root(cfg: Config) -> None:
    """A relative data.root means relative to where the command runs; Ray workers and probe actors
    run elsewhere (their own working folders), so the driver fixes it to an absolute path first."""
    root = cfg.data.root
    if not cfg.is_synthetic and root and "://" not in root and not Path(root).expanduser().is_absolute():
        cfg.data.root = str(Path(root).expanduser().resolve())


def prepare_run(cfg: Config, *, parent_run_id: str | None = None, storage: str | None = None,
                tracking_uri: str | None = None) -> RunHandle:
    """Preflight, then name the run, open its MLflow run (reused on resume) and fix its storage folder.

    tracking_uri: the store to use, as `check_cluster` made it reachable from every node (default:
    tracking.uri / $MLFLOW_TRACKING_URI / ./mlruns)."""
    absolute_data_root(cfg)
    preflight(cfg)
    run_key = cfg.run_name()
    if not cfg.run.resume:
        run_key = f"{run_key}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = contained_run_dir(locate(storage or storage_root(cfg.run.storage)), run_key)
    run_dir.check_reachable()  # before the MLflow run opens: a missing bucket leaves nothing RUNNING
    check_resume_checkpoint(run_dir)  # code in a crafted checkpoint: one line, before Ray and MLflow
    uri = run_id = None
    if cfg.tracking.enabled:
        uri = tracking_uri or tracking.resolve_uri(cfg.tracking)
        tracking.check_reachable(uri)
        run_id = tracking.open_run(cfg, uri, run_key, parent_run_id=parent_run_id)
        if cfg.optim.ema_decay is not None:  # the probe figures are the EMA's, not the live weights'
            tracking.set_tags(uri, run_id, {PROBE_WEIGHTS_TAG: f"ema (optim.ema_decay={cfg.optim.ema_decay:g})"})
    if cfg.optim.ema_decay is not None:
        print(f"[linrep] probes read the EMA of the weights (optim.ema_decay={cfg.optim.ema_decay:g})", flush=True)
    return RunHandle(cfg, run_key, run_dir, uri, run_id)


def storage_root(configured: str) -> str:
    """run.storage as given, or $LINREP_STORAGE when run.storage was left at its default (a local
    path or a URI either way; trainer.storage opens it)."""
    from_env = os.environ.get("LINREP_STORAGE") if configured == DEFAULT_STORAGE else None
    return from_env or configured


def contained_run_dir(storage: Path | str | Location, run_key: str) -> Location:
    """storage/run_key, refused unless it lies inside `storage` (a local folder or a URI).

    The config already restricts run.name to safe characters; this is the second line of defence
    (a name that reached here another way must not put a run folder, or Ray Train's deletions,
    outside the storage folder)."""
    return contained(locate(storage), run_key, what="run.name", where="run.storage")


def check_files_and_store(cfg: Config) -> None:
    """The checks of prepare_run that need no Ray (files, the tracking server): callers run them
    before Ray starts, so bad input fails in seconds (prepare_run repeats them; cached)."""
    absolute_data_root(cfg)
    preflight(cfg)
    if cfg.run.resume:  # the folder a rerun resumes from: reachable, and its newest checkpoint safe
        run_dir = contained_run_dir(locate(storage_root(cfg.run.storage)), cfg.run_name())
        run_dir.check_reachable()
        check_resume_checkpoint(run_dir)
    if cfg.tracking.enabled:
        tracking.check_reachable(tracking.resolve_uri(cfg.tracking))


# ---- the cluster -----------------------------------------------------------------------------
def cluster_nodes() -> tuple[list[cluster.Node], str]:
    """(the alive nodes, this driver's node address), after ray.init."""
    import ray

    return cluster.nodes_from_ray(ray.nodes()), ray.util.get_node_ip_address()


def check_cluster(cfg: Config) -> str | None:
    """After ray.init and before the MLflow run opens (a refusal leaves nothing RUNNING): refuse a
    run the cluster cannot hold; return the tracking URI every node reaches (None: tracking off)."""
    nodes, driver_ip = cluster_nodes()
    grows = cluster.autoscaling()
    cluster.require_fit(cluster.run_demand(cfg), nodes, grows=grows)
    if not cfg.tracking.enabled:
        return None
    uri = tracking.resolve_uri(cfg.tracking)
    reachable = cluster.tracking_uri_for(uri, nodes, driver_ip, grows=grows)
    if reachable != uri:
        print(f"[linrep] tracking: {tracking.redact(uri)} -> {tracking.redact(reachable)} (the head's address: "
              f"{len(nodes)} nodes log there)", file=sys.stderr, flush=True)
    return reachable


# ---- the Ray address -------------------------------------------------------------------------
GCS_DEFAULT_PORT = 6379
ADDRESS_TIMEOUT_S = 3.0


def ray_endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) that a Ray address connects to first, or None when Ray resolves it itself
    ("auto", "local", an http:// dashboard address)."""
    if address in ("auto", "local") or address.startswith(("http://", "https://")):
        return None
    try:
        parts = urlsplit("//" + address.removeprefix("ray://"))
        host, port = parts.hostname, parts.port or GCS_DEFAULT_PORT  # .port raises on a bad port
    except ValueError:
        host = None
    if not host:
        raise UserError(f"Ray address {address!r} is not host:port (e.g. 10.0.0.5:6379, ray://head:10001 or auto)")
    return host, port


def check_ray_address(address: str | None = None, timeout: float = ADDRESS_TIMEOUT_S) -> None:
    """Fail in one line, within `timeout` seconds, when nothing listens at `address` / $RAY_ADDRESS.

    ray.init on an address nobody serves prints GCS retry warnings and waits for minutes; callers
    run this before ray.init and before opening an MLflow run, so nothing is left RUNNING."""
    address = address or os.environ.get("RAY_ADDRESS")
    endpoint = ray_endpoint(address) if address else None
    if endpoint is None:
        return
    try:
        socket.create_connection(endpoint, timeout=timeout).close()
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or err.__class__.__name__)
        raise UserError(f"cannot reach Ray at {address} ({reason.lower()}): start the cluster "
                        "(ray start --head) or fix --address / $RAY_ADDRESS") from None


def init_ray(address: str | None = None) -> None:
    """Join the cluster at `address` / $RAY_ADDRESS, or start a local Ray with this machine's CPUs."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    check_ray_address(address)
    console = progress.start_session()  # before ray.init: what Ray's start-up prints goes to the log
    # log_to_driver stays on: the workers' progress lines ride on that stream (trainer/progress.py)
    kwargs: dict[str, Any] = dict(log_to_driver=True, configure_logging=True, logging_level="WARNING")
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:  # every socket on loopback (gloo's rendezvous too: it uses the node's address)
            use_single_machine_mode()
            ray.init(address="local", include_dashboard=False, _node_ip_address=LOOPBACK, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else err.__class__.__name__
        raise UserError(f"cannot reach Ray at {address or 'local'}: {first}") from None
    console.capture_ray()


def make_trainer(handle: RunHandle, probes: Any = None, callbacks: list | None = None):
    """The TorchTrainer for this run (also used inside Ray Tune trials)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = handle.cfg
    ctx = LoopContext(run_dir=str(handle.run_dir), tracking_uri=handle.tracking_uri, run_id=handle.run_id,
                      probes=probes)
    resources = {"CPU": cfg.run.cpus_per_worker}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "ctx": ctx},
        # gloo's rendezvous (rank 0's TCPStore) on MASTER_ADDR, not the wildcard: see ray_private
        torch_config=bound_torch_config("nccl" if cfg.run.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.run.workers, use_gpu=cfg.run.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=handle.run_key,
            **handle.run_dir.parent.ray_storage(),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
            callbacks=callbacks or None,
            worker_runtime_env={"env_vars": _worker_env(cfg.run.use_gpu)},
        ),
    )


def _worker_env(use_gpu: bool) -> dict[str, str]:
    env = {"PYTHONUNBUFFERED": "1", **cluster.ds_accelerator_env(use_gpu),
           # Train V2 tees print() into its logger as well: every progress line showed twice
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
           **tracking.FAST_FAIL_ENV}
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        env["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]
    return env


def fit(handle: RunHandle, *, probes: Any = None, callbacks: list | None = None) -> RunResult:
    """Run the TorchTrainer to the end (resuming if the run folder has checkpoints).

    callbacks: Ray Train callbacks, e.g. TuneReportCallback() when this runs inside a Tune trial.
    """
    trainer = make_trainer(handle, probes, callbacks)
    # Ray Train passes this variable from the driver to the controller it starts (here or on a cluster)
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(handle.cfg.run.report_poll_s)
    result = None
    with run_console(handle) as outcome:
        try:
            result = trainer.fit()
            err = getattr(result, "error", None)
        except Exception as raised:  # Ray Train raises its worker-group failures: keep their text (root cause)
            if raised.__class__.__name__ not in TRAIN_FAILURES:
                raise
            err = raised
        outcome["failed"] = err is not None
    ckpt = result.checkpoint.path if result is not None and result.checkpoint else None
    metrics = dict(result.metrics or {}) if result is not None else {}
    return RunResult(handle, metrics, ckpt, error=str(err) if err else None)


@contextmanager
def run_console(handle: RunHandle) -> Iterator[dict[str, bool]]:
    """The run's log on the CLI's console while it trains (none inside a sweep's trial: the sweep's
    driver shows it): the run folder holds the log from now on; at the end the console gets its
    path (and its tail when outcome["failed"], or when training raised) and MLflow a copy."""
    console = progress.current_session()
    if console:
        console.attach_run(handle.run_dir)
    outcome = {"failed": True}
    try:
        yield outcome
    finally:
        if console:
            console.end_run(outcome["failed"])
            save_log(handle, console.log.path)


@contextmanager
def patched_env(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` set, restored on exit (keys that were unset are removed again)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def runs_in_process(cfg: Config) -> bool:
    """Whether this run can train in the calling process instead of a Ray Train worker group: one
    CPU worker on the torch engine (no process group to set up; DeepSpeed wants one)."""
    return cfg.run.workers == 1 and not cfg.run.use_gpu and cfg.optim.engine == "ddp"


def probes_need_ray(cfg: Config) -> bool:
    """probe.actor_* asks for resources of the probes' own: they run in a Ray actor, not on a thread."""
    p = cfg.probe
    return p.enabled and bool(p.actor_cpus or p.actor_gpus or p.actor_resources)


def trains_here(cfg: Config, address: str | None = None) -> bool:
    """Whether `linrep train` trains in its own process (run.in_process): a run that allows it, on
    this machine. On a cluster (--address, $RAY_ADDRESS, a Ray already joined) the run's worker must
    go where the cluster has room, so it stays a Ray Train run."""
    wanted = cfg.run.in_process
    if wanted is False:
        return False
    on_cluster = bool(address or os.environ.get("RAY_ADDRESS")) or _ray_joined()
    why_not = ("it has more than one worker, a GPU or the deepspeed engine" if not runs_in_process(cfg)
               else "probe.actor_* gives its probes resources of their own (a Ray actor)" if probes_need_ray(cfg)
               else "it was given a Ray cluster (--address or $RAY_ADDRESS)" if on_cluster else None)
    if wanted and why_not:
        raise UserError(f"run.in_process=true: this run cannot train in the command's process: {why_not}; "
                        "drop run.in_process (or set it false)")
    return why_not is None


def _ray_joined() -> bool:
    ray = sys.modules.get("ray")  # not imported: this process has not joined one
    return bool(ray is not None and ray.is_initialized())


def check_fits_here(cfg: Config) -> None:
    """check_cluster for a run trained in this process: its CPUs on this machine."""
    here = cluster.Node(LOOPBACK, float(os.cpu_count() or 1), 0.0, True)
    cluster.require_fit(cluster.run_demand(cfg), [here])


def fit_in_process(handle: RunHandle, *, probes: Any = None, on_report: Any = None,
                   stop: Any = None) -> RunResult:
    """The run's one worker, trained in this process (`runs_in_process`): the same build -> train
    -> checkpoint code as a Ray Train worker, without a controller and worker group to start.

    A sweep trial uses it (each trial paid ~9 s of Ray Train start-up and teardown: controller,
    worker group, placement-group cleaner, for a few seconds of steps), and so does `linrep train`
    on this machine (`trains_here`). on_report: called with each checkpoint's reported metrics;
    stop: a threading.Event that ends the loop (StopRequested). A failure restarts the worker from
    the newest checkpoint in the run folder, up to run.max_failures times, as Ray Train does; a
    crash of the process itself ends the run (a rerun resumes it)."""
    cfg = handle.cfg
    ctx = LoopContext(run_dir=str(handle.run_dir), tracking_uri=handle.tracking_uri, run_id=handle.run_id,
                      probes=probes)
    session = InProcessSession(str(handle.run_dir), on_report=on_report, stop=stop)
    with run_console(handle) as outcome:
        for attempt in range(cfg.run.max_failures + 1):
            error = _train_attempt(cfg, ctx, session)
            if error is None or attempt == cfg.run.max_failures:
                break
            progress.emit("note", text=f"the worker failed ({error[:160]}): restarting from the newest checkpoint "
                                       f"({attempt + 1}/{cfg.run.max_failures}, run.max_failures)")
        outcome["failed"] = error is not None
    return RunResult(handle, session.last_metrics, session.last_checkpoint, error=error)


def _train_attempt(cfg: Config, ctx: LoopContext, session: InProcessSession) -> str | None:
    """One run_worker in this process: None, or the failure as one line (its traceback to the log)."""
    import torch

    try:
        with patched_env(tracking.FAST_FAIL_ENV):  # as in a Train worker: MLflow calls fail fast, the logger retries
            run_worker(cfg, ctx, session, torch.device("cpu"))
    except StopRequested:  # a stop, not a failure (SystemExit and Ctrl-C pass the handler below anyway)
        raise
    except Exception as err:  # the same one-line path as a failed Ray Train run (fit_and_probe)
        import traceback

        console = progress.current_session()  # the CLI's: the traceback goes to the run's log, as a worker's does
        traceback.print_exc(file=console.log if console else sys.stderr)
        return f"{err.__class__.__name__}: {err}"
    return None


# what Ray Train 2.60's fit() raises when the run fails (the workers' errors are in its text)
TRAIN_FAILURES = ("WorkerGroupError", "TrainingFailedError", "ControllerError")
# ENOSPC and EROFS as Python and pyarrow word them ("[Errno 28] ...", "Detail: [errno 28] ...")
DISK_FAULT = re.compile(r"\[errno (28|30)\]|no space left on device|read-only file system", re.IGNORECASE)


def resume_hint(run_dir: Location, cause: str) -> str:
    """What to do after a failure the run folder's disk caused (full, read-only): the checkpoint a
    rerun starts from. The cut-short checkpoint is never it (checkpoint.list_checkpoints)."""
    if not DISK_FAULT.search(cause):
        return ""
    from trainer.checkpoint import list_checkpoints, read_meta

    try:
        complete = list_checkpoints(run_dir)
        point = f"step {read_meta(complete[-1])['step']}" if complete else "the start (no complete checkpoint)"
    except Exception:  # the folder itself may be unreadable now
        point = "its newest complete checkpoint"
    return (f"; the run folder {run_dir} is on a full or read-only disk: make room (or make it writable) and "
            f"rerun the same command, it resumes from {point}")


def save_log(handle: RunHandle, path: Path) -> None:
    """The run's log file as an MLflow artifact (logs/linrep.log); an outage costs only the copy."""
    if not handle.run_id or not path.exists():
        return
    try:
        tracking.log_artifact(handle.tracking_uri, handle.run_id, path, "logs")
    except Exception as err:
        print(f"warning: the log {path} was not copied to MLflow run {handle.run_id}: "
              f"{err.__class__.__name__}", file=sys.stderr, flush=True)
