"""`linrep sweep SPEC`: a sweep plan -> Ray Tune -> one full trainer run (+ probes) per trial.

Execution. A Ray Tune Tuner runs a function trainable per trial; the function builds the trial's
config, opens its MLflow child run under the sweep's parent run and calls
`probes.pipeline.fit_and_probe` with a TuneReportCallback, so the Ray Train run's checkpoint
reports (train/loss, step and the latest probe figures) reach Tune and its scheduler (Ray 2.60:
Tuner(TorchTrainer) is gone; Ray Train inside a function trainable is the supported pattern).
The trial function itself reserves no CPU (its TorchTrainer's workers do), so on a 2-core machine
two 1-worker trials run at once; concurrency is capped by what the cluster's CPUs/GPUs fit.
When Tune stops a trial (ASHA, or Ctrl-C on the driver) the trainable's cleanup aborts the Train
run through its controller before the trial's actor goes (see `abort_active_run`).

In-process trials. A plan whose every trial is one CPU worker on the torch engine (the synthetic
sweeps and `reproduce synthetic`) trains inside the trial function instead
(trainer.run.fit_in_process, `resources.in_process`, default auto): the trial then reserves its
worker's CPUs itself, its probes run on a thread of that process (probes.actor.LocalProbe,
unless probe.actor_* asks for resources of their own), Tune reuses the warm trial processes for
the next trials, and a stop ends the loop at its next step or report. Same checkpoints, child
runs, probe figures, ledger, resume and run.max_failures restarts; what it saves is the Train
controller, worker group and probe actor each trial started for seconds of steps.

Folders. <storage>/<sweep name>/ holds Tune's experiment state beside what tune.folder owns: the
state file (parent MLflow run id, the plan's fingerprint), plan.json, runs/<trial key>/ (each
trial's Ray Train run) and the trial ledgers trials/<trial key>.json.

MLflow. Through trainer.tracking only: the parent run carries linrep.sweep = the sweep's name and
linrep.role = sweep; each trial's own trainer run is its child run (tag linrep.run_key = trial key).

Resume. Rerunning the same command builds a new Tuner over the trials whose ledger shows no end
(finished or stopped trials are not rerun; failed and unfinished ones are); each restarts its
function, which resumes the Ray Train run from its latest checkpoint and reuses its MLflow child
run; the parent run is reused. Tune's own saved experiment is never restored (`Tuner.restore`
unpickles files from the sweep folder, which anyone who can write that folder could craft).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from trainer import cluster, ray_private, tracking
from trainer.cluster import Demand, Node
from trainer.errors import RuntimeFault, UserError
from trainer.storage import Location, locate
from trainer.progress import current_session
from tune.folder import STATE_FILE, TERMINAL, TrialLedger, ledger_counts, read_state, write_plan, write_state
from tune.spec import SweepPlan, Trial, build_plan, load_spec, trial_config
from tune.summary import Summary, best_trial, publish_summary

TRIAL_MEMORY = 128 * 2**20  # the trial function's reservation: a little memory, no CPU (see module doc)
SWEEP_TAG = "linrep.sweep"  # on the parent run and every child run: the sweep's name
ROLE_TAG = "linrep.role"    # "sweep" on the parent run


# ---- the trial -------------------------------------------------------------------------------
@dataclass
class TrialContext:
    """What every trial function needs besides its Trial (shipped to the trial actors)."""

    sweep: str
    sweep_dir: str
    tracking_uri: str
    parent_run_id: str
    in_process: bool = False        # train inside the trial function (see the module doc)


@dataclass
class ActiveRun:
    """The Ray Train run this trial process is executing (Tune gives each trial its own actor)."""

    stop_flag: Location             # raised when Tune stops the trial: a stop, not a failure
    box: Any                        # a small actor holding the run's Train controller handle (None: in-process)
    done: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)  # ends an in-process run's loop


_ACTIVE: ActiveRun | None = None


def run_trial(trial: Trial, ctx: TrialContext, report: Callable[[dict], None]) -> dict[str, float]:
    """One full trainer run with probes, as a child run of the sweep; returns its final figures."""
    from probes.pipeline import fit_and_probe
    from trainer.checkpoint import list_checkpoints, read_meta
    from trainer.run import prepare_run

    global _ACTIVE
    ledger = TrialLedger(ctx.sweep_dir, trial.key)
    done = ledger.read()
    if done.get("status") in TERMINAL:  # ended before the driver died: report, never rerun
        report({**done.get("final", {}), "step": done.get("step", 0), "linrep_skipped": 1})
        return done.get("final", {})
    ledger.stop_flag.unlink(missing_ok=True)
    # Tune runs the function in the trial folder: every path is absolute, the store comes by env
    os.environ["MLFLOW_TRACKING_URI"] = ctx.tracking_uri
    cfg = trial_config(trial, locate(ctx.sweep_dir) / "runs")
    cfg.tracking.uri = None
    if cfg.tracking.log_models is None:  # the sweep logs its best child's models when it ends
        cfg.tracking.log_models = False
    handle = prepare_run(cfg, parent_run_id=ctx.parent_run_id)
    if handle.run_id:
        tracking.set_tags(ctx.tracking_uri, handle.run_id, {
            SWEEP_TAG: ctx.sweep, "linrep.group": trial.group, "linrep.seed": trial.seed})
    ckpts = list_checkpoints(handle.run_dir)
    ledger.start(handle.run_id, read_meta(ckpts[-1])["step"] if ckpts else 0)
    _ACTIVE = active = ActiveRun(ledger.stop_flag, None if ctx.in_process else _controller_box())
    try:
        if ctx.in_process:
            outcome = fit_and_probe(handle, in_process={"on_report": _stoppable(report, active), "stop": active.stop})
        else:
            outcome = fit_and_probe(handle, callbacks=[_report_callback(str(ledger.stop_flag)),
                                                       _register_controller(active.box)])
    except BaseException as err:
        if ledger.stop_flag.exists():  # Tune stopped the trial and aborted its Train run: not a failure
            ledger.end("interrupted")
            if handle.run_id:
                tracking.set_status(ctx.tracking_uri, handle.run_id, "KILLED")
            if isinstance(err, SystemExit):  # Tune's stop of an in-process trial: end the thread as Tune
                raise                        # expects (a return would report once more and block)
            return {}
        ledger.end("failed", error=_first_line(err))
        raise
    finally:
        active.done.set()
    final = {k: float(v) for k, v in outcome.final.items()}
    ledger.end("finished", final=final, step=cfg.optim.steps)
    report({**final, "step": cfg.optim.steps, "linrep_final": 1})
    return final


def abort_active_run(timeout_s: float = 180.0) -> None:
    """Called when Tune stops a trial (scheduler decision, driver interrupt) while its run trains.

    Tune would otherwise just drop the trial's actor: the TorchTrainer inside never hears of it
    and, once the actor dies, its workers' placement group can outlive it (Ray Train's cleaner
    needs the state API), holding the CPUs the next trial waits for. So: raise the stop flag (the
    report callback stops waiting on Tune; run_trial then records a stop, not a failure) and abort
    the Train controller, which shuts its workers down and removes their placement group.
    """
    import ray

    run = _ACTIVE
    if run is None or run.done.is_set():
        return
    run.stop_flag.touch()
    run.stop.set()
    if run.box is None:  # in-process: the loop ends at its next step, or at its report once Tune lets go
        return
    try:
        controller = ray.get(run.box.get.remote(), timeout=30)
        if controller is not None:
            ray.get(controller.abort.remote(), timeout=timeout_s)
    except Exception:  # abort ends the controller actor: the call errors by design
        pass
    run.done.wait(timeout=30)  # let run_trial record the stop before the actor goes


def _stoppable(report: Callable[[dict], None], run: ActiveRun) -> Callable[[dict], None]:
    """Tune's report for an in-process trial. When Tune stops the trial, its report raises
    SystemExit in the training thread, with or without `cleanup` (a trial process kept for reuse
    is reset instead): raise the stop flag first, so run_trial records a stop, not a failure."""

    def report_or_stop(metrics: dict) -> None:
        try:
            report(metrics)
        except SystemExit:
            run.stop_flag.touch()
            run.stop.set()
            raise

    return report_or_stop


STOP_WAIT_S = 60.0  # a stopped in-process run: time to record the stop, end its MLflow run, drop its probe actor


def wait_for_stop(timeout_s: float = STOP_WAIT_S) -> None:
    """After a stop, let an in-process trial's run_trial record it (and close its logger) before
    Tune takes the trial process away."""
    run = _ACTIVE
    if run is not None and run.box is None and run.stop.is_set():
        run.done.wait(timeout=timeout_s)


def _first_line(err: BaseException) -> str:
    """The exception in one line: its class and the line that names the cause (a Ray error's
    first line only names the actor it came from)."""
    from probes.pipeline import root_cause

    text = str(err).strip()
    return f"{err.__class__.__name__}: {root_cause(text) if text else ''}"


class _ControllerBox:
    """Holds the Train controller's actor handle for the trial process (set by the controller)."""

    def __init__(self):
        self.handle = None

    def set(self, handle) -> None:
        self.handle = handle

    def get(self):
        return self.handle


def _controller_box():
    import ray

    return ray.remote(num_cpus=0)(_ControllerBox).remote()


def _register_controller(box):
    """A Ray Train controller callback: hands the controller's own handle to `box` at start."""

    class RegisterController(ray_private.controller_callback_class()):
        def __init__(self, box):
            self.box = box

        def after_controller_start(self, train_run_context) -> None:
            import ray

            self.box.set.remote(ray.get_runtime_context().current_actor)

    return RegisterController(box)


def _report_callback(stop_flag: str):
    """TuneReportCallback that stops waiting for Tune to take a report once the trial is stopped.

    Tune's own callback blocks on a one-slot queue that nobody reads after a stop, which would
    also block the Train controller's event loop and with it the abort.
    """
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
    from ray.util.queue import Full

    class SweepReportCallback(TuneReportCallback):
        def __init__(self, flag: str):
            super().__init__()
            self._flag = flag

        def after_report(self, run_context, metrics, checkpoint):
            item = {**metrics[0], **({CHECKPOINT_PATH_KEY: checkpoint.path} if checkpoint else {})}
            while not locate(self._flag).exists():
                try:
                    ray_private.put_training_item(self, item, timeout=1.0)
                    return
                except Full:
                    continue

    return SweepReportCallback(stop_flag)


def make_trainable(plan: SweepPlan, ctx: TrialContext):
    """The Tune trainable of this sweep: param 'trial' (a trial key) -> run_trial.

    A function trainable (what Ray 2.60 supports around Ray Train) whose cleanup, run when Tune
    stops the trial, first aborts the trial's Train run.
    """
    trials = {t.key: t for t in plan.trials}

    def linrep_trial(config: dict) -> None:
        from ray import tune

        run_trial(trials[config["trial"]], ctx, tune.report)

    class LinrepTrial(ray_private.function_trainable_class(linrep_trial)):
        def cleanup(self):
            abort_active_run()
            super().cleanup()  # releases an in-process trial's report: its loop ends there
            wait_for_stop()

        def reset_config(self, new_config):
            """A kept trial process takes the next trial (in-process sweeps reuse them): end the
            previous run as cleanup would. Tune waits for its thread only 2 s by default; a stopped
            run still closes its MLflow run and probe actor, so it gets as long as cleanup gives."""
            abort_active_run()
            os.environ["TUNE_FUNCTION_THREAD_TIMEOUT_S"] = str(int(STOP_WAIT_S))
            return super().reset_config(new_config)

    return LinrepTrial


def trial_name(trial) -> str:
    """Tune's trial name and folder: the trial key (module level: Tune pickles it)."""
    return str(trial.config["trial"])


def trial_ended(name: str, status: str) -> None:
    """Tell the console's sweep table (trainer.progress.SweepBoard) that a trial ended, whatever its
    last step: one stopped by run.stop_at or a scheduler is not left "running"."""
    session = current_session()
    if session is not None:
        session.on_event({"kind": "trial_end", "run": name, "status": status})


def _tune_callback_class():
    from ray import tune

    class SweepProgress(tune.Callback):
        """One console line per trial start / end, with the sweep's counts (stateless: resumable)."""

        def __init__(self, sweep_dir: str, keys: list[str], metric: str):
            self.sweep_dir, self.keys, self.metric = sweep_dir, keys, metric

        def _counts(self, trials, ended=None) -> str:
            c = ledger_counts(self.sweep_dir, self.keys)
            ended_id = getattr(ended, "trial_id", None)
            running = sum(getattr(t, "status", "") == "RUNNING" and getattr(t, "trial_id", 0) != ended_id
                          for t in trials)
            return (f"{c.get('finished', 0)}/{len(self.keys)} finished, {running} running"
                    + (f", {c['failed']} failed" if c.get("failed") else "")
                    + (f", {c['stopped']} stopped early" if c.get("stopped") else ""))

        def on_trial_start(self, iteration, trials, trial, **info):
            print(f"[sweep] start {trial_name(trial)}  ({self._counts(trials)})", file=sys.stderr, flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            ledger = TrialLedger(self.sweep_dir, trial_name(trial))
            d = ledger.read()
            if d.get("status") not in TERMINAL and d.get("attempts"):
                ledger.mark_stopped()  # ended by the scheduler (ASHA), not by its last step
                d = ledger.read()
            value = d.get("final", {}).get(self.metric)
            shown = f"  {self.metric}={value:.4f}" if isinstance(value, (int, float)) else ""
            trial_ended(trial_name(trial), d.get("status", "finished"))
            print(f"[sweep] {d.get('status', 'done')} {trial_name(trial)}{shown}  ({self._counts(trials, trial)})",
                  file=sys.stderr, flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            trial_ended(trial_name(trial), "failed")
            print(f"[sweep] FAILED {trial_name(trial)}  ({self._counts(trials, trial)})", file=sys.stderr, flush=True)

    return SweepProgress


# ---- the driver ------------------------------------------------------------------------------
@dataclass
class SweepOutcome:
    plan: SweepPlan
    parent_run_id: str
    tracking_uri: str
    sweep_dir: Location
    counts: dict[str, int]
    summary: Summary | None = None
    artifacts: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def resolve_tracking_uri(plan: SweepPlan) -> str:
    """The sweep's MLflow store: the trials' tracking.uri, else $MLFLOW_TRACKING_URI, else ./mlruns.

    tracking.* is per sweep (a spec may set it only under overrides), so the first trial's config
    speaks for every trial.
    """
    cfg = trial_config(plan.trials[0])
    if not cfg.tracking.enabled:
        raise UserError(f"sweep {plan.name}: tracking.enabled=false, but a sweep's summary is read from MLflow")
    return tracking.resolve_uri(cfg.tracking)


def open_sweep(plan: SweepPlan, uri: str) -> str:
    """Create or reopen the sweep folder and its MLflow parent run; return the parent run id.

    A changed plan under an existing name is refused (its trials' runs would mix two configs).
    """
    sweep_dir = plan.sweep_dir
    state = read_state(sweep_dir)
    fingerprint = plan.fingerprint()
    if state and state.get("fingerprint") != fingerprint:
        raise UserError(f"sweep '{plan.name}' in {sweep_dir} was started from a different spec or overrides; "
                        "rerun it unchanged to resume, or give this one another --name")
    exp_id = tracking.ensure_experiment(uri, plan.experiment)  # on the driver, before any trial: no races
    parent = state.get("parent_run_id") if state else None
    if parent and not tracking.run_exists(uri, parent):
        parent = None  # another tracking store than last time: start a parent run there
    if parent is None:
        existing = find_parent(uri, exp_id, plan.name)
        if existing and not state:
            raise UserError(f"sweep '{plan.name}': MLflow experiment '{plan.experiment}' already holds a sweep of "
                            f"that name (parent run {existing}) but {sweep_dir / STATE_FILE} is missing; "
                            "give this sweep another --name (or delete those runs)")
        parent = existing or _create_parent(plan, uri, exp_id)
    tracking.set_status(uri, parent, "RUNNING")
    write_state(sweep_dir, {
        "name": plan.name, "fingerprint": fingerprint, "parent_run_id": parent, "experiment": plan.experiment,
        "experiment_id": exp_id, "tracking_uri": tracking.redact(uri), "trials": len(plan.trials),
        "created": (state or {}).get("created", time.time()), "kind": plan.kind})
    write_plan(sweep_dir, plan.to_json())
    return parent


def find_parent(uri: str, experiment_id: str, sweep: str) -> str | None:
    """The parent run of sweep `sweep` in this experiment (the oldest, should there be several)."""
    runs = tracking.find_runs(uri, experiment_id, {SWEEP_TAG: sweep, ROLE_TAG: "sweep"}, max_results=1)
    return runs[0].run_id if runs else None


def _create_parent(plan: SweepPlan, uri: str, exp_id: str) -> str:
    parent = tracking.create_run(uri, exp_id, plan.name, tags={
        SWEEP_TAG: plan.name, ROLE_TAG: "sweep", "linrep.kind": plan.kind,
        "linrep.git_commit": tracking.git_commit() or "", "linrep.sweep_dir": str(plan.sweep_dir)})
    params = {"sweep.trials": len(plan.trials), "sweep.configurations": len(plan.groups()),
              "sweep.swept": ",".join(plan.swept), "sweep.metric": plan.metric, "sweep.mode": plan.mode,
              "sweep.scheduler": "asha" if plan.asha else "fifo",
              **{f"sweep.resources.{k}": v for k, v in plan.resources.items()}}
    tracking.log_params(uri, parent, params)
    if plan.spec_text:
        tracking.log_text(uri, parent, plan.spec_text, "sweep_spec.yaml")
    tracking.log_text(uri, parent, plan.to_json(), "sweep_plan.json")
    return parent


def trials_in_process(plan: SweepPlan) -> bool:
    """Whether the trials train inside their trial functions: resources.in_process, or (auto) when
    every trial is one CPU worker on the torch engine (trainer.run.runs_in_process)."""
    from trainer.run import runs_in_process

    wanted = plan.resources.get("in_process")
    fits = all(runs_in_process(trial_config(t)) for t in plan.trials)
    if wanted and not fits:
        raise UserError(f"sweep {plan.name}: resources.in_process=true needs one CPU worker on the torch engine "
                        "(resources.workers=1, use_gpu=false, optim.engine=ddp) in every trial; drop it")
    return fits if wanted is None else bool(wanted)


def trial_demand(plan: SweepPlan) -> Demand:
    """What one trial reserves: its Train workers (the spec's resources) and its probe actor."""
    r, probe = plan.resources, trial_config(plan.trials[0]).probe
    return Demand(f"sweep {plan.name}: one trial", r["workers"], r["cpus_per_worker"], 1.0 if r["use_gpu"] else 0.0,
                  probe.actor_cpus if probe.enabled else 0.0, probe.actor_gpus if probe.enabled else 0.0)


SWEEP_FIX = "lower resources.workers or resources.cpus_per_worker in the spec (or the probe.actor_* overrides)"


def trial_concurrency(plan: SweepPlan, nodes: list[Node], grows: bool = False) -> int:
    """How many trials run at once: the spec's max_concurrent, capped by what the cluster's nodes
    hold (trial bundles packed per node, as for one run); refused when not even one trial fits.
    On an autoscaling cluster (grows) the cap is the spec's: Tune queues the rest and the
    autoscaler adds nodes for them."""
    demand = trial_demand(plan)
    cluster.require_fit(demand, nodes, fix=SWEEP_FIX, grows=grows)
    if grows:
        return min(plan.max_concurrent or len(plan.trials), len(plan.trials))
    fits = cluster.copies_that_fit(demand, nodes, len(plan.trials))
    if plan.max_concurrent and plan.max_concurrent > fits:
        print(f"[sweep] max_concurrent={plan.max_concurrent} but the cluster fits {fits} trials now; "
              f"running {fits} at a time", file=sys.stderr, flush=True)
    return min(plan.max_concurrent or fits, fits)


def pending_trials(plan: SweepPlan) -> list[str]:
    """The trials a run of this sweep must (re)start: every one whose ledger shows no end."""
    return [t.key for t in plan.trials if TrialLedger(plan.sweep_dir, t.key).status not in TERMINAL]


def announce_resume(plan: SweepPlan, pending: list[str]) -> None:
    if any(TrialLedger(plan.sweep_dir, t.key).status for t in plan.trials):  # a trial started before
        print(f"[sweep] resuming {plan.name} from {plan.sweep_dir}: {len(plan.trials) - len(pending)} of "
              f"{len(plan.trials)} trials already ended, {len(pending)} to run", file=sys.stderr, flush=True)


def build_tuner(plan: SweepPlan, ctx: TrialContext, concurrency: int, pending: list[str]):
    """A new Tuner over the `pending` trials, for a first run and a resume alike.

    Never `Tuner.restore`: Tune's saved experiment (tuner.pkl, experiment_state-*.json) is
    cloudpickled, and restoring it runs whatever code a crafted file in the sweep folder carries
    (anyone who can write a shared volume or bucket). A resume is rebuilt from linrep's own JSON
    ledger instead: finished and stopped trials are skipped, the others start again and resume
    their Ray Train runs from their checkpoints (runs/<key>/).
    """
    from ray import tune

    # in-process trials hold their worker's CPUs themselves; otherwise the Train workers do
    cpus = plan.resources["cpus_per_worker"] if ctx.in_process else 0
    trainable = tune.with_resources(make_trainable(plan, ctx), {"CPU": cpus, "memory": TRIAL_MEMORY})
    exp_dir = plan.sweep_dir
    scheduler = None
    if plan.asha:
        # stop_last_trials=False: a trial that reaches max_t ends by itself (with its final probe)
        scheduler = tune.schedulers.ASHAScheduler(**plan.asha, stop_last_trials=False)
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # early reports precede the first probe
    progress = _tune_callback_class()(str(exp_dir), [t.key for t in plan.trials], plan.metric)
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(pending)},
        # reuse_actors: the next in-process trial starts in a warm process (torch, MLflow imported)
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, scheduler=scheduler, reuse_actors=ctx.in_process,
                                    trial_name_creator=trial_name, trial_dirname_creator=trial_name),
        run_config=tune.RunConfig(name=plan.name, **locate(plan.storage).ray_storage(), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0), callbacks=[progress]),
    )


def run_sweep(plan: SweepPlan, *, address: str | None = None, out: Callable[[str], None] = print,
              extra_tables: Callable | None = None) -> SweepOutcome:
    """Run (or resume) a sweep to the end, then write, log and print its summary.

    extra_tables: Summary -> {file name: markdown}, more tables for the parent run (reproduce's layout).
    """
    from trainer.progress import watch_sweep
    from trainer.run import check_ray_address, cluster_nodes, init_ray

    check_ray_address(address)  # before the parent run opens: a bad address leaves nothing RUNNING
    in_process = trials_in_process(plan)  # resources.in_process refused here, before Ray and MLflow
    plan.sweep_dir.check_reachable()
    uri = resolve_tracking_uri(plan)
    tracking.check_reachable(uri)
    if plan.asha:
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    init_ray(address)
    watch_sweep(plan.sweep_dir)  # the live table of trials (trainer/progress.py); Ray's lines go to the log
    # before the parent run opens: a sweep the cluster cannot hold, or a store other nodes cannot
    # reach, is refused with nothing RUNNING; trials get the URI every node reaches
    nodes, driver_ip = cluster_nodes()
    concurrency = trial_concurrency(plan, nodes, grows=cluster.autoscaling())
    uri = cluster.tracking_uri_for(uri, nodes, driver_ip, grows=cluster.autoscaling())
    parent = open_sweep(plan, uri)
    ctx = TrialContext(plan.name, str(plan.sweep_dir), uri, parent, in_process=in_process)
    out(f"sweep {plan.name}: {len(plan.trials)} trials ({len(plan.groups())} configurations x seeds), "
        f"folder {plan.sweep_dir}, MLflow parent run {parent} in '{plan.experiment}' ({tracking.redact(uri)})")
    out(f"sweep {plan.name}: up to {concurrency} trials at a time")
    pending = pending_trials(plan)
    announce_resume(plan, pending)
    grid = build_tuner(plan, ctx, concurrency, pending).fit() if pending else []
    failed = {}
    for result in grid:
        if result.error is not None:
            key = Path(result.path).name if result.path else "?"
            failed[key] = failure_cause(plan, key, str(result.error))
    counts = ledger_counts(plan.sweep_dir, [t.key for t in plan.trials])
    mark_stopped_runs(plan, uri)
    summary, artifacts = publish_summary(plan, uri, parent, out=out, extra_tables=extra_tables)
    log_best_child_models(plan, summary, uri)
    complete = counts.get("finished", 0) + counts.get("stopped", 0) == len(plan.trials)
    tracking.set_status(uri, parent, "FINISHED" if complete else ("FAILED" if failed else "KILLED"))
    return SweepOutcome(plan, parent, uri, plan.sweep_dir, counts, summary, artifacts, failed)


def log_best_child_models(plan: SweepPlan, summary: Summary | None, uri: str) -> None:
    """With tracking.log_models unset, trials log no models (2-5 s each): the best child run, the
    one the parent run links to, gets its final and best classifiers here (once: a rerun of a
    finished sweep finds them logged)."""
    from probes.pipeline import publish_outputs
    from trainer.run import contained_run_dir, storage_root

    child = best_trial(summary) if summary is not None else None
    if child is None:
        return
    cfg = trial_config(child.trial, locate(plan.sweep_dir) / "runs")
    if cfg.tracking.log_models is not None:  # set in the spec: each trial logged its own, or none did
        return
    run_dir = contained_run_dir(locate(storage_root(cfg.run.storage)), cfg.run_name())
    publish_outputs(uri, child.run_id, run_dir, cfg, plot=False)  # a failure warns: the sweep is done


def failure_cause(plan: SweepPlan, key: str, error: str) -> str:
    """What stopped a failed trial, in one line: what its ledger recorded (the trial's own
    exception), else the line of Tune's error that names the cause (its first line only names the
    trial actor: 'ray::ResourceTrainable.train() (pid=..., ip=...)')."""
    from probes.pipeline import root_cause

    recorded = TrialLedger(plan.sweep_dir, key).read().get("error") if key != "?" else None
    return (recorded or (root_cause(error) if error.strip() else "error"))[:300]


def mark_stopped_runs(plan: SweepPlan, uri: str) -> None:
    """Child runs of trials the scheduler stopped early end KILLED (not FAILED, not RUNNING)."""
    for t in plan.trials:
        d = TrialLedger(plan.sweep_dir, t.key).read()
        if d.get("status") == "stopped" and d.get("run_id"):
            tracking.set_status(uri, d["run_id"], "KILLED")
            tracking.set_tags(uri, d["run_id"], {"linrep.stopped_early": "scheduler"})


def finish_message(outcome: SweepOutcome) -> int:
    """Exit status of a sweep: 0 when every trial ended; faults name the first failed trial."""
    n = len(outcome.plan.trials)
    c = outcome.counts
    ended = c.get("finished", 0) + c.get("stopped", 0)
    if ended == n:
        return 0
    if outcome.failed or c.get("failed"):
        first = next(iter(outcome.failed.items()), (None, None))
        nfail = max(len(outcome.failed), c.get("failed", 0))
        raise RuntimeFault(f"sweep {outcome.plan.name}: {nfail} of {n} trials failed"
                           + (f" (first: {first[0]}: {first[1]})" if first[0] else "")
                           + "; rerun the same command to resume them")
    raise RuntimeFault(f"sweep {outcome.plan.name}: {n - ended} of {n} trials did not finish; "
                       "rerun the same command to resume them")


def run_sweep_cli(args) -> int:
    """`linrep sweep SPEC [key=value ...] [--address A] [--name N]`."""
    spec, text, path = load_spec(args.spec, name=getattr(args, "name", None))
    plan = build_plan(spec, spec_text=text, where=str(path), cli_overrides=list(args.overrides or []),
                      storage=getattr(args, "storage", None))
    outcome = run_sweep(plan, address=getattr(args, "address", None))
    print(f"\nsweep {plan.name}: {outcome.counts.get('finished', 0)}/{len(plan.trials)} trials finished; "
          f"MLflow parent run {outcome.parent_run_id} (experiment '{plan.experiment}'); "
          f"summary in {plan.sweep_dir / 'summary'}")
    return finish_message(outcome)
