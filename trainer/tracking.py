"""MLflow, and only here: the one tracking interface of linrep.

Everything that reads or writes runs goes through this module's public functions (nothing else
imports mlflow; an import-linter contract enforces it):
- runs: `open_run` (a training run, found again on resume), `create_run` (a sweep parent, a
  benchmark, a probe report), `find_runs` / `get_run` / `run_exists`, `child_runs`,
  `set_status` / `end_run`, `set_tags`;
- values: `log_params` (batched; params already on the run are kept), `log_metrics` (one step),
  `MetricLogger` (many steps, buffered), `metric_history` / `metric_points` / `latest_metrics`;
- files: `log_artifact`, `log_text`, `log_figure`; models through trainer/model_logging.py;
- what the UI browses (trainer/model_logging.py decides what, this module talks to MLflow):
  `log_pyfunc_model` (an MLflow 3 logged model, optionally registered), `download_model`,
  `log_dataset` (a run's input), `start_system_metrics` (CPU, memory, GPU when pynvml is there).

mlflow is imported lazily (workers that never log never import it). The default store is a sqlite
database ./mlruns/mlflow.db with artifacts under ./mlruns/artifacts; MLFLOW_TRACKING_URI (or
tracking.uri) points elsewhere, e.g. an `mlflow server` over http on a cluster.

MetricLogger buffers metrics and writes them in batches; a failed write keeps them buffered and is
retried at the next flush (a tracking server that goes away mid-run does not stop training); on a
resumed run it skips (key, step) pairs already in the store, so every step is logged exactly once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.config import Config, TrackingConfig, redact_uri
from trainer.errors import UserError

DEFAULT_DIR = Path("mlruns")
RUN_KEY_TAG = "linrep.run_key"
JOB_ID_TAG = "linrep.ray_job_id"
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
PARAM_MAX_CHARS = 6000   # MLflow's limit on a param value
PARAM_BATCH = 100        # MLflow's limit on params per log_batch
SECRET_MARKERS = ("TOKEN", "SECRET", "PASSWORD", "KEY", "CREDENTIAL")


def default_tracking_uri() -> str:
    DEFAULT_DIR.mkdir(exist_ok=True)
    return f"sqlite:///{(DEFAULT_DIR / 'mlflow.db').resolve()}"


def resolve_uri(tracking: TrackingConfig) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else the local sqlite store (absolute path)."""
    uri = tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///"):]
        Path(rel).parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{Path(rel).resolve()}"
    return uri


def redact(uri: str) -> str:
    """http://user:secret@host -> http://***@host (never log credentials)."""
    return redact_uri(uri)


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, when an http tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            if resp.status >= 500:
                raise UserError(f"MLflow tracking server {redact(uri)} answered HTTP {resp.status}")
    except urllib.error.HTTPError as err:
        if err.code >= 500:
            raise UserError(f"MLflow tracking server {redact(uri)} answered HTTP {err.code}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(f"MLflow tracking server {redact(uri)} is unreachable ({reason}); "
                        "start it or set MLFLOW_TRACKING_URI / tracking.uri") from None


def _client(uri: str):
    import logging

    from mlflow.tracking import MlflowClient

    for name in ("mlflow", "alembic"):  # store-creation chatter is not for the user's console
        logging.getLogger(name).setLevel(logging.WARNING)

    return MlflowClient(tracking_uri=uri)


def artifact_root(uri: str) -> str | None:
    """With the local sqlite store, artifacts go under ./mlruns/artifacts (next to the database)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "artifacts").resolve().as_uri()
    return None


def ensure_experiment(uri: str, name: str) -> str:
    """Experiment id for `name`, created if missing (on the driver, before any trial: no races)."""
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = artifact_root(uri)
    try:
        return client.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)
    except Exception:  # created concurrently by another driver
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit() -> str | None:
    """The code's commit: from git, else LINREP_GIT_COMMIT (set by `linrep submit`: jobs carry no .git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("LINREP_GIT_COMMIT") or None


def ray_job_id() -> str | None:
    """The Ray job this process runs in, when submitted through the Jobs API: LINREP_RAY_JOB_ID
    (set by `linrep submit`), else the submission id Ray puts in RAY_JOB_CONFIG_JSON_ENV_VAR
    (the only place a KubeRay RayJob driver finds it)."""
    if os.environ.get("LINREP_RAY_JOB_ID"):
        return os.environ["LINREP_RAY_JOB_ID"]
    try:
        import json

        meta = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata", {})
        return meta.get("job_submission_id") or None
    except (ValueError, AttributeError):
        return None


def open_run(cfg: Config, uri: str, run_key: str, *, parent_run_id: str | None = None,
             extra_tags: dict[str, str] | None = None) -> str:
    """Find the MLflow run of `run_key` (resume) or create it; log params, tags and the config."""
    exp_id = ensure_experiment(uri, cfg.experiment_name)
    found = find_runs(uri, exp_id, {RUN_KEY_TAG: run_key}, max_results=1) if cfg.run.resume else []
    if found:
        run_id = found[0].run_id
        set_status(uri, run_id, "RUNNING")
    else:
        run_id = create_run(uri, exp_id, run_key, tags={RUN_KEY_TAG: run_key, "linrep.preset": cfg.preset or ""},
                            parent_run_id=parent_run_id)
        log_params(uri, run_id, cfg.flatten())
        log_text(uri, run_id, cfg.to_yaml(), "config.yaml")
    set_tags(uri, run_id, {JOB_ID_TAG: ray_job_id(), "linrep.git_commit": git_commit(), **(extra_tags or {})})
    return run_id


@dataclass
class RunRecord:
    """What linrep reads back of one MLflow run (times in unix seconds)."""

    run_id: str
    name: str
    status: str
    start_time: float
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The trainer's run key (a sweep trial's key), else the run's name."""
        return self.tags.get(RUN_KEY_TAG, self.name)


def _record(run) -> RunRecord:
    return RunRecord(run.info.run_id, run.info.run_name or "", run.info.status, (run.info.start_time or 0) / 1000.0,
                     dict(run.data.metrics), dict(run.data.params), dict(run.data.tags))


def create_run(uri: str, experiment_id: str, name: str, *, tags: dict[str, str] | None = None,
               parent_run_id: str | None = None) -> str:
    """A new run named `name` (RUNNING), optionally the child of `parent_run_id`; returns its id."""
    all_tags = {RUN_NAME_TAG: name, **{k: str(v) for k, v in (tags or {}).items()}}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    return _client(uri).create_run(experiment_id, run_name=name, tags=all_tags).info.run_id


def find_runs(uri: str, experiment_id: str, tags: dict[str, str], *, max_results: int = 1000) -> list[RunRecord]:
    """Runs of an experiment whose tags equal `tags`, oldest first (every page, up to max_results)."""
    # tag values are linrep's own names (run keys, sweep names: letters, digits, - _ . = only)
    filter_string = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    client, out, token = _client(uri), [], None
    while len(out) < max_results:
        page = client.search_runs([experiment_id], filter_string=filter_string,
                                  order_by=["attributes.start_time ASC"],
                                  max_results=min(1000, max_results - len(out)), page_token=token)
        out.extend(_record(r) for r in page)
        token = page.token
        if not token:
            break
    return out


def child_runs(uri: str, experiment_id: str, parent_run_id: str) -> list[RunRecord]:
    """Every child run of `parent_run_id` (a sweep's trials), oldest first."""
    return find_runs(uri, experiment_id, {PARENT_TAG: parent_run_id}, max_results=1_000_000)


def get_run(uri: str, run_id: str) -> RunRecord:
    """One run's record; UserError when the store has no such run."""
    try:
        return _record(_client(uri).get_run(run_id))
    except Exception:
        raise UserError(f"MLflow run {run_id} not found in {redact(uri)}") from None


def run_exists(uri: str, run_id: str) -> bool:
    try:
        _client(uri).get_run(run_id)
        return True
    except Exception:
        return False


def set_status(uri: str, run_id: str, status: str) -> None:
    """RUNNING reopens a run (a resume); FINISHED / FAILED / KILLED end it."""
    if status == "RUNNING":
        _client(uri).update_run(run_id, status="RUNNING")
    else:
        _client(uri).set_terminated(run_id, status=status)


def end_run(uri: str, run_id: str, status: str = "FINISHED", wait_s: float = 0.0, retry_every_s: float = 5.0) -> None:
    """Mark the run ended. With wait_s > 0 a failed write is retried until wait_s has passed: a run that
    ends while the tracking server restarts must not stay RUNNING in the UI (found on the test bed:
    a 54 s server outage at the end of a run left it RUNNING). Raises the last error after wait_s."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            set_status(uri, run_id, status)
            return
        except Exception:
            if time.monotonic() + retry_every_s > deadline:
                raise
            time.sleep(retry_every_s)


def set_tags(uri: str, run_id: str, tags: dict[str, Any]) -> None:
    """Set tags (values as strings; None or empty values are skipped)."""
    client = _client(uri)
    for key, value in tags.items():
        if value is not None and value != "":
            client.set_tag(run_id, key, str(value))


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    """Log params not yet on the run, in batches (MLflow refuses to change a logged param)."""
    from mlflow.entities import Param

    client = _client(uri)
    have = client.get_run(run_id).data.params
    new = [Param(k, str(v)[:PARAM_MAX_CHARS]) for k, v in params.items() if k not in have]
    for i in range(0, len(new), PARAM_BATCH):
        client.log_batch(run_id, params=new[i:i + PARAM_BATCH])


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log finite metric values at one step (NaN/inf are skipped: MLflow's UI cannot plot them)."""
    import math

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    values = [Metric(k, float(v), ts, step) for k, v in metrics.items()
              if isinstance(v, (int, float)) and math.isfinite(float(v))]
    for i in range(0, len(values), 1000):
        _client(uri).log_batch(run_id, metrics=values[i:i + 1000])


def log_artifact(uri: str, run_id: str, path: Path, artifact_path: str | None = None) -> None:
    _client(uri).log_artifact(run_id, str(path), artifact_path)


def log_text(uri: str, run_id: str, text: str, name: str) -> None:
    _client(uri).log_text(run_id, text, name)


def log_figure(uri: str, run_id: str, figure, name: str) -> None:
    """A matplotlib figure as an image artifact `name` (e.g. "figures/probe.png")."""
    _client(uri).log_figure(run_id, figure, name)


def _fluent_uri(uri: str):
    """MLflow's model logging reads the tracking URI from its global state: MLflow's own context
    sets it for the call and puts back what was there (a sweep's driver talks to one store, a
    test to several)."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    return _use_tracking_uri(uri)


@dataclass
class LoggedModel:
    """What log_pyfunc_model made: the MLflow 3 logged model and, when asked, its registry version."""

    model_id: str
    model_uri: str                   # models:/<model_id>
    registered_name: str | None = None
    version: str | None = None


def log_pyfunc_model(uri: str, run_id: str, data_dir: Path, *, loader_module: str, name: str,
                     example: tuple[Any, Any], pip_requirements: list[str], step: int = 0,
                     tags: dict[str, str] | None = None, register_as: str | None = None) -> LoggedModel:
    """A pyfunc model of the `loader_module` flavour (MLflow imports that installed module and calls
    its `_load_pyfunc(data_path)`: no python_model pickle, no code from the artifact) holding
    `data_dir`, as an MLflow 3 logged model of run `run_id` at `step`; its signature is inferred
    from `example` = (input, output) numpy arrays. register_as: also a version of that registered
    model."""
    import mlflow
    from mlflow.models import Model, infer_signature

    inputs, outputs = example
    client = _client(uri)
    run = client.get_run(run_id)
    # created here, in the run's experiment (Model.log would put it in the fluent API's active
    # experiment, the Default one), with the run's params as the model's
    model = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id,
                                       params=dict(run.data.params), tags=tags, model_type="classifier")
    with _fluent_uri(uri):
        info = Model.log(artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id, step=step,
                         model_id=model.model_id,
                         loader_module=loader_module, data_path=str(data_dir),
                         signature=infer_signature(inputs, outputs), input_example=inputs,
                         pip_requirements=pip_requirements, registered_model_name=register_as,
                         await_registration_for=0)
    version = getattr(info, "registered_model_version", None)
    return LoggedModel(info.model_id, info.model_uri, register_as, str(version) if version else None)


def download_model(uri: str, model_uri: str, dst: Path) -> Path:
    """A logged model's files (MLmodel, data/...) under `dst`; nothing in them is loaded."""
    import mlflow

    with _fluent_uri(uri):
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))


def logged_models(uri: str, run_id: str) -> list[dict[str, Any]]:
    """The logged models of a run: [{model_id, name, step, tags}], oldest first."""
    client = _client(uri)
    run = client.get_run(run_id)
    found = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'",
                                        order_by=[{"field_name": "creation_timestamp", "ascending": True}])
    return [{"model_id": m.model_id, "name": m.name, "tags": dict(m.tags or {})} for m in found]


def log_dataset(uri: str, run_id: str, *, name: str, digest: str, source_type: str, source: dict[str, Any],
                schema: dict[str, Any] | None = None, profile: dict[str, Any] | None = None,
                context: str = "training") -> None:
    """A run's input dataset as the UI lists it (name, digest, source); logging it again is a no-op
    in MLflow (same name and digest)."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(name=name, digest=digest, source_type=source_type, source=json.dumps(source),
                      schema=json.dumps(schema) if schema else None,
                      profile=json.dumps(profile) if profile else None)
    inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])]
    client = _client(uri)
    for attempt in range(DATASET_ATTEMPTS):
        try:
            client.log_inputs(run_id, datasets=inputs)
            return
        except Exception as err:
            # MLflow looks the dataset up, then inserts it: two runs logging the same dataset at once
            # (a sweep's trials starting together) race, and the loser's insert fails on the unique
            # key (seen: 1 of 6 processes). Again, it finds the winner's row and links to it.
            if attempt == DATASET_ATTEMPTS - 1 or not _lost_insert_race(err):
                raise
            time.sleep(0.2 * (attempt + 1))


DATASET_ATTEMPTS = 3


def _lost_insert_race(err: Exception) -> bool:
    """A unique-key violation (sqlite, PostgreSQL, MySQL wording): another writer inserted the row."""
    text = str(err)
    return any(s in text for s in ("UNIQUE constraint failed", "duplicate key", "IntegrityError"))


def run_datasets(uri: str, run_id: str) -> list[dict[str, Any]]:
    """[{name, digest, source_type, source, context}] of a run's logged inputs."""
    import json

    inputs = _client(uri).get_run(run_id).inputs
    return [{"name": d.dataset.name, "digest": d.dataset.digest, "source_type": d.dataset.source_type,
             "source": json.loads(d.dataset.source),
             "context": next((t.value for t in d.tags if t.key == "mlflow.data.context"), None)}
            for d in (inputs.dataset_inputs if inputs else [])]


class SystemMetrics:
    """MLflow's system-metrics sampler (system/cpu_utilization_percentage, system/system_memory_*,
    system/gpu_* when pynvml finds a GPU) on one run, from a thread of its own that stops by
    itself once the run is no longer RUNNING or the store cannot be read. stop() is bounded, as
    MetricLogger.close: a hung server never holds up the end of training."""

    def __init__(self, uri: str, run_id: str, interval_s: float, stop_timeout_s: float = 30.0):
        import logging

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # its "started/stopped monitoring" lines and a missing pynvml are not for the user's console
        logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
        # resume_logging: a resumed run (or a restarted worker) goes on after the steps already stored
        self.monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True,
                                            tracking_uri=uri)
        self.stop_timeout_s = stop_timeout_s
        self.monitor.start()

    @property
    def thread(self) -> threading.Thread | None:
        return self.monitor._process

    def stop(self) -> None:
        stopper = threading.Thread(target=self._finish, name="linrep-system-metrics-stop", daemon=True)
        stopper.start()
        stopper.join(self.stop_timeout_s)

    def _finish(self) -> None:
        """MLflow's finish() drops the sample taken since the last publish (a monitor stopped within
        its first interval logged nothing: seen with a 2-second training on a 1-second interval):
        publish it as the last step."""
        self.monitor.finish()
        if any(m.metrics for m in self.monitor.monitors):
            try:
                self.monitor.publish_metrics(self.monitor.aggregate_metrics())
                self.monitor.mlflow_logger.flush()
            except Exception:  # the store went away meanwhile: the samples before it are stored
                pass


def start_system_metrics(uri: str, run_id: str, interval_s: float = 10.0) -> SystemMetrics | None:
    """System metrics on `run_id` every interval_s, or None (with one warning) when MLflow cannot
    sample them here (psutil missing): training goes on without."""
    try:
        return SystemMetrics(uri, run_id, interval_s)
    except Exception as err:
        print(f"warning: no system metrics for MLflow run {run_id}: {err.__class__.__name__}: {str(err)[:160]}",
              file=sys.stderr, flush=True)
        return None


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """[(step, value)] of one metric, by step."""
    return sorted((m.step, m.value) for m in _client(uri).get_metric_history(run_id, key))


def metric_points(uri: str, run_id: str, key: str) -> list[tuple[int, float, float]]:
    """[(step, value, unix seconds)] of one metric, by step (for throughput over time)."""
    return sorted((m.step, m.value, m.timestamp / 1000.0) for m in _client(uri).get_metric_history(run_id, key))


def latest_metrics(uri: str, run_id: str) -> dict[str, float]:
    return dict(_client(uri).get_run(run_id).data.metrics)


class MetricLogger:
    """log(metrics, step): buffered, retried, exactly once per (key, step) across resumes and outages.

    Exactly once: a resumed run reads the last stored step of each key (`resume_from`) and skips
    replayed steps. When the store cannot be read then (a restart during an outage), the keys stay
    unresolved: their values are buffered but nothing is written until a flush has read the stored
    steps and dropped what is already there. Steps of a key are written in increasing order, so the
    last stored step is a watermark.

    background=True (the training loop): a writer thread does the writes. log() only touches the
    buffer, so a hung server (each HTTP call can block for MLFLOW_HTTP_REQUEST_TIMEOUT x retries)
    never stalls a training step. flush() -- before a checkpoint is reported, so that what precedes
    it is stored before a resume could start from it -- waits for the writer at most flush_wait_s,
    and not at all while it backs off or is stuck in a write older than that; close() is bounded too.
    """

    def __init__(self, uri: str, run_id: str, *, flush_every_s: float = 5.0, max_buffer: int = 100_000,
                 background: bool = False, flush_wait_s: float = 5.0, close_timeout_s: float = 30.0):
        self.uri, self.run_id = uri, run_id
        self.flush_every_s, self.max_buffer = flush_every_s, max_buffer
        self.buffer: list[tuple[str, float, int, int]] = []
        self.last_step: dict[str, int] = {}
        self.unresolved: set[str] = set()  # keys whose stored steps are not known yet
        self.dropped = 0
        self._last_flush = time.monotonic()
        self._warned = False
        self._client = None
        self._backoff_s = 0.0        # grows while the store is unreachable: training is never held up
        self._next_try = 0.0
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # one writer at a time (the thread, or close's last try)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._close_timeout_s = close_timeout_s
        self.flush_wait_s = flush_wait_s
        self._write_started: float | None = None  # monotonic start of the write in flight
        self._writer = None
        if background:
            self._writer = threading.Thread(target=self._write_loop, name="linrep-metric-writer", daemon=True)
            self._writer.start()

    @property
    def client(self):
        if self._client is None:
            self._client = _client(self.uri)
        return self._client

    def resume_from(self, keys: list[str]) -> None:
        """Remember the last logged step of each key, so a replayed step is not logged twice. A key
        the store cannot answer for now stays unresolved (see the class docstring)."""
        for key in keys:
            try:
                hist = self.client.get_metric_history(self.run_id, key)
            except Exception:
                with self._lock:
                    self.unresolved.add(key)
                continue
            if hist:
                with self._lock:
                    self.last_step[key] = max(self.last_step.get(key, -1), max(m.step for m in hist))

    def log(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        with self._lock:
            for key, value in metrics.items():
                if step <= self.last_step.get(key, -1):
                    continue  # already in the store (a replay after resume)
                self.buffer.append((key, float(value), ts, step))
                self.last_step[key] = step
            if len(self.buffer) > self.max_buffer:
                overflow = len(self.buffer) - self.max_buffer
                self.dropped += overflow
                del self.buffer[:overflow]
        if time.monotonic() - self._last_flush > self.flush_every_s:
            self._last_flush = time.monotonic()
            if self._writer is not None:
                self._wake.set()  # never wait here: this is the training step
            else:
                self._write(force=False)

    def flush(self, force: bool = False) -> bool:
        """Write the buffer; on failure keep it, warn once, and back off (10 s doubling to 5 min).
        True when everything is stored. Background mode: wake the writer and wait for it, bounded
        (see the class docstring)."""
        self._last_flush = time.monotonic()
        if self._writer is None:
            return self._write(force)
        self._wake.set()
        deadline = time.monotonic() + self.flush_wait_s
        while True:
            with self._lock:
                if not self.buffer and not self.unresolved:
                    return True
            now = time.monotonic()
            started = self._write_started
            stuck = started is not None and now - started > self.flush_wait_s
            if now >= deadline or now < self._next_try or stuck:
                return False
            time.sleep(0.01)

    def _write_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=max(self.flush_every_s, 0.05))
            self._wake.clear()
            if not self._stop.is_set():
                self._write(force=False)

    def _resolve(self) -> None:
        """Read the stored steps of unresolved keys and drop buffered values already stored
        (raises while the store is away: nothing is written before this succeeds)."""
        with self._lock:
            keys = sorted(self.unresolved)
        stored = {}
        for key in keys:
            hist = self.client.get_metric_history(self.run_id, key)
            stored[key] = max((m.step for m in hist), default=-1)
        with self._lock:
            self.buffer = [b for b in self.buffer if b[3] > stored.get(b[0], -1)]
            for key, step in stored.items():
                self.last_step[key] = max(self.last_step.get(key, -1), step)
            self.unresolved -= set(stored)

    def _write(self, force: bool) -> bool:
        from mlflow.entities import Metric

        with self._write_lock:
            with self._lock:
                if not self.buffer and not self.unresolved:
                    return True
            if not force and time.monotonic() < self._next_try:
                return False
            self._write_started = time.monotonic()
            try:
                if self.unresolved:
                    self._resolve()
                while True:
                    with self._lock:
                        chunk = self.buffer[:1000]
                    if not chunk:
                        break
                    self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, s) for k, v, ts, s in chunk])
                    with self._lock:
                        del self.buffer[:len(chunk)]  # log() only appends: the chunk is still at the front
            except Exception as err:
                self._backoff_s = min(300.0, max(10.0, 2 * self._backoff_s))
                self._next_try = time.monotonic() + self._backoff_s
                if not self._warned:
                    print(f"warning: MLflow write failed ({err.__class__.__name__}); buffering "
                          f"{len(self.buffer)} metric values and retrying", file=sys.stderr, flush=True)
                    self._warned = True
                return False
            finally:
                self._write_started = None
            if self._warned:
                print("MLflow writes resumed; buffered metrics written", file=sys.stderr, flush=True)
            self._warned = False
            self._backoff_s = 0.0
            return True

    def close(self, retries: int | None = 3, wait_s: float = 2.0) -> None:
        """Last tries every wait_s until the buffer is written, `retries` tries were made (None: no
        limit) or close_timeout_s has passed; then a warning counting what could not be written.
        The training loop closes with retries=None and close_timeout_s=tracking.outage_wait_s: a
        store restarting at the end of a run gets its last steps once it is back. In background
        mode the close takes at most close_timeout_s, even against a hung server."""
        deadline = time.monotonic() + self._close_timeout_s
        if self._writer is not None:
            self._stop.set()
            self._wake.set()
            closer = threading.Thread(target=self._last_tries, args=(retries, wait_s, deadline), daemon=True)
            closer.start()
            closer.join(self._close_timeout_s)
        else:
            self._last_tries(retries, wait_s, deadline)
        with self._lock:
            left = len(self.buffer) + self.dropped
        if left:
            print(f"warning: {left} metric values could not be written to "
                  f"MLflow ({redact(self.uri)}) and were dropped", file=sys.stderr, flush=True)

    def _last_tries(self, retries: int | None, wait_s: float, deadline: float) -> None:
        tries = 0
        while not self._write(force=True):
            tries += 1
            if (retries is not None and tries >= retries) or time.monotonic() + wait_s >= deadline:
                return
            time.sleep(wait_s)


# Fail fast against an unreachable tracking server (MLflow's defaults retry for minutes).
FAST_FAIL_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def scrub_env_secrets(text: str) -> str:
    """Replace the values of secret-looking environment variables found in `text`."""
    for key, value in os.environ.items():
        if value and len(value) >= 6 and any(m in key.upper() for m in SECRET_MARKERS) and value in text:
            text = text.replace(value, "***")
    return text
