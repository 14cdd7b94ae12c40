"""Train and probe: the trainer's run with a probe actor attached, and re-probing finished runs."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from probes.actor import (BEST_METRIC, ActorProbes, LocalProbe, ProbesLost, probe_checkpoint, probe_family,
                          start_probe_actor)
from trainer import model_logging, progress, tracking
from trainer.checkpoint import list_checkpoints, read_meta
from trainer.config import Config
from trainer.errors import RuntimeFault, UserError
from trainer.run import (RunHandle, check_cluster, check_files_and_store, check_fits_here, check_ray_address, fit,
                         fit_in_process, init_ray, probes_need_ray, resume_hint, prepare_run, trains_here)
from trainer.storage import Location, locate

RUN_DIR_TAG = "linrep.run_dir"
PROBED_KEY = "probe/seconds"  # every probe family logs it


@dataclass
class Outcome:
    run_key: str
    run_id: str | None
    tracking_uri: str | None
    run_dir: Location                  # local folder or URI
    final: dict[str, float]            # the last checkpoint's probe figures (+ last train loss)
    history: dict[int, dict[str, float]]


def train_and_probe(cfg: Config, *, address: str | None = None, parent_run_id: str | None = None) -> Outcome:
    """Run training through Ray Train with a probe actor beside it (or, for a one-worker CPU run on
    this machine, in this process with its probes on a thread: trainer.run.trains_here); return the
    final figures."""
    check_ray_address(address)  # before the MLflow run opens: an unreachable address leaves nothing RUNNING
    here = trains_here(cfg, address)
    check_files_and_store(cfg)  # bad data or a tracking server that is away: fail before Ray starts
    if here:
        console = progress.start_session()
        check_fits_here(cfg)
        console.note("training in this process (one CPU worker on this machine; run.in_process=false: Ray Train)")
        uri = tracking.resolve_uri(cfg.tracking) if cfg.tracking.enabled else None
        handle = prepare_run(cfg, parent_run_id=parent_run_id, tracking_uri=uri)
        return fit_and_probe(handle, in_process={})
    init_ray(address)
    uri = check_cluster(cfg)    # the run fits the cluster, every node reaches the store: before the run opens
    handle = prepare_run(cfg, parent_run_id=parent_run_id, tracking_uri=uri)
    return fit_and_probe(handle)


def fit_and_probe(handle: RunHandle, *, callbacks: list | None = None, in_process: dict | None = None) -> Outcome:
    """fit() with the run's probes beside it (start_probes); ends the MLflow run FINISHED or FAILED.

    in_process: train in this process instead (trainer.run.fit_in_process; its on_report and stop
    keywords), as a sweep's one-worker trial does."""
    cfg = handle.cfg
    if handle.run_id:
        tracking.set_tags(handle.tracking_uri, handle.run_id, {RUN_DIR_TAG: str(handle.run_dir)})
        try:  # what the run trained on, for the UI: a store error costs the record, not the run
            model_logging.log_run_dataset(handle.tracking_uri, handle.run_id, cfg)
        except Exception as err:
            print(f"warning: the dataset of MLflow run {handle.run_id} was not logged: "
                  f"{err.__class__.__name__}: {str(err)[:200]}", file=sys.stderr, flush=True)
    probes = start_probes(handle, in_process=in_process is not None) if cfg.probe.enabled else None
    if probes is not None:
        queue_unprobed(handle, probes)
    status = "FAILED"
    try:
        result = (fit_in_process(handle, probes=probes, **in_process) if in_process is not None
                  else fit(handle, probes=probes, callbacks=callbacks))
        if result.error:
            cause = root_cause(result.error)
            raise RuntimeFault(f"training run {handle.run_key} failed: {cause}{resume_hint(handle.run_dir, cause)}")
        history = drain_probes(probes, handle) if probes else {}
        publish_run(handle)
        status = "FINISHED"
    finally:
        if handle.run_id:
            try:
                tracking.end_run(handle.tracking_uri, handle.run_id, status, wait_s=cfg.tracking.outage_wait_s)
            except Exception as err:  # a tracking outage must not hide the training outcome
                print(f"warning: could not mark MLflow run {handle.run_id} {status}: {err.__class__.__name__}",
                      file=sys.stderr)
        if probes is not None:
            probes.close()
    final = dict(history[max(history)]) if history else {}
    if not final and handle.run_id:  # a rerun of a finished run: figures are already in MLflow
        try:
            final = {k: v for k, v in tracking.latest_metrics(handle.tracking_uri, handle.run_id).items()
                     if k.startswith(("probe/", "val/"))}
        except Exception:
            final = {}
    return Outcome(handle.run_key, handle.run_id, handle.tracking_uri, handle.run_dir, final, history)


def start_probes(handle: RunHandle, *, in_process: bool) -> ActorProbes | LocalProbe:
    """The run's probes: its probe actor (ActorProbes), or, for a run trained in this process, a
    thread here (LocalProbe), unless probe.actor_* asks for resources of their own."""
    if in_process and not probes_need_ray(handle.cfg):
        return LocalProbe(handle.tracking_uri, handle.run_id, handle.cfg)
    return ActorProbes(start_probe_actor(handle.tracking_uri, handle.run_id, handle.cfg))


def publish_run(handle: RunHandle) -> None:
    """A finished run's models (final, best by the probe headline), its probe plot: what the MLflow
    UI shows (trainer/model_logging.py). A failure here warns: the training itself is done."""
    if not handle.run_id:
        return
    publish_outputs(handle.tracking_uri, handle.run_id, handle.run_dir, handle.cfg,
                    models=handle.cfg.tracking.log_models is not False)


def publish_outputs(uri: str, run_id: str, run_dir: Location, cfg: Config, *, models: bool = True,
                    plot: bool = True) -> None:
    """A finished run's probe plot and final and best classifiers, each when asked; a failure
    warns. A sweep calls it with plot=False for its best child run (whose trial logged the plot)."""
    try:
        best_metric = BEST_METRIC[probe_family(cfg)] if cfg.probe.enabled else None
        if models:
            model_logging.log_run_models(uri, run_id, run_dir, cfg, best_metric)
        if plot:
            model_logging.log_probe_plot(uri, run_id, best_metric)
    except Exception as err:
        print(f"warning: could not log the models of MLflow run {run_id}: "
              f"{err.__class__.__name__}: {str(err)[:200]}", file=sys.stderr, flush=True)


def drain_probes(probes, handle: RunHandle) -> dict[int, dict[str, float]]:
    """The probes still queued, waited for at most probe.drain_timeout_s; past it (a probe that
    hangs, an actor gone for good), one warning line names the checkpoints left unprobed and the
    run finishes anyway."""
    try:
        return probes.drain(handle.cfg.probe.drain_timeout_s, lambda: unprobed(handle))
    except ProbesLost as err:
        warn_unprobed(handle, str(err))
        return {}


def warn_unprobed(handle: RunHandle, why: str) -> None:
    """One warning line: why the drain ended, and the checkpoints left unprobed."""
    steps = [step for step, _ in unprobed(handle)]
    left = f"steps {', '.join(map(str, steps))} under {handle.run_dir}" if steps else "none"
    print(f"warning: {why}; checkpoints not probed: {left}", file=sys.stderr, flush=True)


def unprobed(handle: RunHandle) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints due a probe (every probe.every-th, and the last)
    whose probe neither finished nor failed, by the attempts ledger (probes/attempts.py)."""
    from probes.attempts import read_ledger

    cfg = handle.cfg
    if not handle.run_dir.is_dir():
        return []
    ledger = read_ledger(handle.run_dir)
    out = []
    for path in list_checkpoints(handle.run_dir):
        step = read_meta(path)["step"]
        due = (step // cfg.run.checkpoint_every) % cfg.probe.every == 0 or step == cfg.optim.steps
        if due and ledger.get(step, {}).get("state") not in ("done", "failed"):
            out.append((step, path))
    return out


def root_cause(error: str) -> str:
    """The line of a Ray error that names the cause (our own one-line faults first)."""
    lines = [l.strip() for l in error.splitlines() if l.strip()]
    for marker in ("RuntimeFault: ", "UserError: ", "ConfigError: "):
        hits = [l for l in lines if marker in l]
        if hits:
            return hits[-1].split(marker, 1)[1][:300]
    errors = [l for l in lines if l.split(":")[0].endswith(("Error", "Exception"))]
    return (errors[-1] if errors else lines[0] if lines else "unknown error")[:300]


def queue_unprobed(handle: RunHandle, probes) -> list[int]:
    """On resume: probe the checkpoints a killed driver left unprobed (training goes on meanwhile)."""
    probed = set()
    if handle.run_id:
        probed = {step for step, _ in tracking.metric_history(handle.tracking_uri, handle.run_id, PROBED_KEY)}
    queued = []
    for path in list_checkpoints(handle.run_dir):
        step = read_meta(path)["step"]
        if step not in probed:
            probes.submit(str(path), step)
            queued.append(step)
    return queued


def find_run_dir(run_id: str, tracking_uri: str) -> Location:
    """The checkpoint folder of a run (a local folder or a URI), from its tag (UserError when the
    run or the folder is missing)."""
    tagged = tracking.get_run(tracking_uri, run_id).tags.get(RUN_DIR_TAG)
    run_dir = locate(tagged) if tagged else None
    if run_dir is None or not run_dir.is_dir():
        raise UserError(f"MLflow run {run_id}: its checkpoint folder ({tagged or 'unknown'}) is not reachable "
                        "from this machine (a local folder elsewhere, or storage credentials missing from the env)")
    return run_dir


def reprobe_run(run_id: str, tracking_uri: str, log: bool = True, progress: Any = print) -> dict[int, dict[str, float]]:
    """Probe every checkpoint of a finished run again and log the figures at their steps."""
    run_dir = find_run_dir(run_id, tracking_uri)
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise UserError(f"no complete checkpoints under {run_dir}")
    state: dict = {}
    out = {}
    stored: dict[str, set[int]] = {}  # key -> steps already in MLflow (from training or an earlier re-probe)
    for i, path in enumerate(ckpts, 1):
        step, figures = probe_checkpoint(path, state)
        out[step] = figures
        if log:
            for key in figures.keys() - stored.keys():
                stored[key] = {s for s, _ in tracking.metric_history(tracking_uri, run_id, key)}
            missing = {k: v for k, v in figures.items() if step not in stored[k]}  # each step once
            logger = tracking.MetricLogger(tracking_uri, run_id)
            logger.log(missing, step)
            logger.close()
        progress(f"[{i}/{len(ckpts)}] step {step}: " + "  ".join(f"{k.split('/', 1)[1]}={v:.4f}"
                                                            for k, v in figures.items()))
    return out
