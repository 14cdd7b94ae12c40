"""Probes of checkpoints: a registry by dataset family, and the Ray actor that runs them.

`probe_checkpoint(path)` rebuilds the model from the checkpoint alone and computes its figures.
`ProbeActor` receives checkpoint paths as training reports them, probes them in order while the
workers keep training, and logs each figure to the run's MLflow run at the checkpoint's step. It
restarts if it dies (max_restarts=-1) and Ray retries the call it was running (max_task_retries=-1),
so a checkpoint whose probe was interrupted is probed again; already-logged steps are not logged twice.
Attempts per checkpoint are bounded (probe.max_attempts, counted in the run folder by
probes/attempts.py): a checkpoint whose probe kills the actor every time is recorded as failed
(MLflow tag linrep.probe_failed.<step>, a warning line) and the next one is probed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from trainer.checkpoint import load_classifier
from trainer.config import Config
from trainer.storage import Location, locate

_PROBES: dict[str, Callable[..., dict[str, float]]] = {}
# The figure that ranks checkpoints for retention (higher is better).
BEST_METRIC = {"synthetic": "probe/r2_affine", "dislib": "val/acc", "imagenet": "val/acc"}
# A checkpoint whose probe failed: tag linrep.probe_failed.<step> = the reason, on the run.
FAILED_TAG_PREFIX = "linrep.probe_failed."
# The order in which tables and summaries show the probe figures (the headline first).
FIGURE_ORDER = ["probe/r2_affine", "probe/r2_linear", "probe/sv_mae", "probe/r2_w", "probe/r2_g"]


def register_probe(family: str):
    def deco(fn):
        _PROBES[family] = fn
        return fn
    return deco


def probe_family(cfg: Config) -> str:
    if cfg.is_synthetic:
        return "synthetic"
    return "imagenet" if cfg.data.dataset == "imagenet" else "dislib"


@register_probe("synthetic")
def _synthetic(model, cfg: Config, meta: dict, state: dict) -> dict[str, float]:
    from probes.synthetic import synthetic_figures
    from trainer.data.synthetic import SyntheticDGP

    if "dgp" not in state:  # the DGP is fixed by the config: build it once per actor
        state["dgp"] = SyntheticDGP(cfg.data, cfg.data_seed)
    return synthetic_figures(model, cfg, state["dgp"])


@register_probe("dislib")
def _dislib(model, cfg: Config, meta: dict, state: dict) -> dict[str, float]:
    from probes.factors import factor_figures

    return factor_figures(model, cfg, state)


@register_probe("imagenet")
def _imagenet(model, cfg: Config, meta: dict, state: dict) -> dict[str, float]:
    from probes.imagenetx import checkpoint_probe

    return checkpoint_probe(model, cfg, state)


def probe_model(model, cfg: Config, meta: dict, state: dict | None = None) -> dict[str, float]:
    """The figures of the probe family `cfg` belongs to, for a classifier in memory (`state`
    carries what a probe builds once per run, e.g. the synthetic DGP)."""
    return _PROBES[probe_family(cfg)](model, cfg, meta, state if state is not None else {})


def probe_checkpoint(path: str | Path | Location, state: dict | None = None, device: str = "cpu", with_config: bool = False):
    """(step, figures) of one checkpoint folder: a local path or a URI (downloaded to this node's
    temporary folder first) (+ its config with with_config)."""
    model, cfg, meta = load_classifier(path, device)
    figures = probe_model(model, cfg, meta, state)
    return (meta["step"], figures, cfg) if with_config else (meta["step"], figures)


class _ProbeActor:
    def __init__(self, tracking_uri: str | None, run_id: str | None, threads: int = 1, max_attempts: int = 2,
                 outage_wait_s: float = 90.0):
        import torch

        if threads:  # 0: a runner inside the training process keeps that process's threads
            torch.set_num_threads(threads)
        self.uri, self.run_id = tracking_uri, run_id
        self.max_attempts = max_attempts
        self.state: dict[str, Any] = {}
        self.results: dict[int, dict[str, float]] = {}
        self.scores: dict[int, float] = {}  # step -> the retention metric
        self._latest: dict[str, float] = {}
        self.logger = None
        if tracking_uri and run_id:
            from trainer.tracking import MetricLogger

            self.logger = MetricLogger(tracking_uri, run_id, flush_every_s=0, close_timeout_s=outage_wait_s)
            self._resume_keys_loaded = False

    def probe(self, path: str, step: int) -> dict[str, float]:
        """Probe, log, then apply retention. A probe that fails is reported, never raised:
        training must not be failed by a probe."""
        from probes.attempts import is_done

        run_dir = locate(path).parent
        if is_done(run_dir, step):  # asked twice (the drain re-asks for calls lost with their caller)
            return self.results.get(step, {})
        if not self._start_attempt(path, step):
            return {}
        t0 = time.perf_counter()
        try:
            _, figures, cfg = probe_checkpoint(path, self.state, with_config=True)
        except Exception as err:
            print(f"warning: probe of {path} failed: {err.__class__.__name__}: {str(err)[:200]}", flush=True)
            self._record_failure(run_dir, step, f"{err.__class__.__name__}: {str(err)[:200]}")
            return {}
        figures["probe/seconds"] = time.perf_counter() - t0
        if self.logger:
            if not self._resume_keys_loaded:  # after a restart or a resumed run: skip logged steps
                self.logger.resume_from(list(figures))
                self._load_scores(BEST_METRIC[probe_family(cfg)])
                self._resume_keys_loaded = True
            self.logger.log(figures, step)
            self.logger.flush()
            self._log_artifacts(step)
        self.results[step] = figures
        self._latest = {**figures, "step": step}
        self._mark(run_dir, step, "done")
        self._retain(run_dir, cfg, step, figures)
        return figures

    def _start_attempt(self, path: str, step: int) -> bool:
        """Count this attempt before probing (the count outlives this process); False when the
        checkpoint's attempts are used up: it is then recorded as failed."""
        from probes.attempts import start_attempt

        run_dir = locate(path).parent
        if not run_dir.is_dir():
            return True  # nothing to probe there either: probe_checkpoint will say so
        try:
            attempt = start_attempt(run_dir, step, self.max_attempts)
        except OSError as err:  # a read-only run folder: probe unbounded rather than not at all
            print(f"warning: cannot count probe attempts in {run_dir}: {err}", flush=True)
            return True
        if attempt is None:
            reason = f"the probe actor died in each of its {self.max_attempts} attempts (probe.max_attempts)"
            print(f"warning: probe of step {step} ({path}) failed: {reason}; not probed, going on", flush=True)
            self._record_failure(run_dir, step, reason)
            return False
        return True

    def _record_failure(self, run_dir: Location, step: int, reason: str) -> None:
        """The failed step, in the ledger and as the MLflow tag linrep.probe_failed.<step>."""
        self._mark(run_dir, step, "failed", reason)
        if self.uri and self.run_id:
            from trainer.tracking import set_tags

            try:
                set_tags(self.uri, self.run_id, {f"{FAILED_TAG_PREFIX}{step}": reason})
            except Exception as err:  # a tracking outage must not stop the next probe
                print(f"warning: could not tag the failed probe of step {step}: {err.__class__.__name__}", flush=True)

    @staticmethod
    def _mark(run_dir: Location, step: int, state: str, reason: str | None = None) -> None:
        from probes.attempts import finish

        if run_dir.is_dir():
            try:
                finish(run_dir, step, state, reason)
            except OSError as err:
                print(f"warning: cannot record the probe of step {step} as {state} in {run_dir}: {err}", flush=True)

    def _retain(self, run_dir: Location, cfg: Config, step: int, figures: dict[str, float]) -> None:
        """Keep the last run.keep_checkpoints checkpoints plus the best by the family's probe metric."""
        from trainer.checkpoint import prune_checkpoints

        key = BEST_METRIC[probe_family(cfg)]
        if key in figures:
            self.scores[step] = figures[key]
        best = max(self.scores, key=self.scores.get) if self.scores else None
        try:
            # checkpoints newer than this one are still queued for their probe: keep them
            prune_checkpoints(run_dir, cfg.run.keep_checkpoints, best, probed_up_to=step)
        except OSError as err:
            print(f"warning: checkpoint retention failed: {err}", flush=True)

    def _log_artifacts(self, step: int) -> None:
        """Tables a probe left in state["artifacts"], under probes/step_<step>/ on the run."""
        from trainer.tracking import log_text

        for name, text in self.state.pop("artifacts", {}).items():
            try:
                log_text(self.uri, self.run_id, text, f"probes/step_{step:08d}/{name}")
            except Exception as err:  # a tracking hiccup must not fail the probe
                print(f"warning: could not log probe artifact {name}: {err.__class__.__name__}", flush=True)

    def _load_scores(self, key: str) -> None:
        from trainer.tracking import metric_history

        try:
            self.scores.update(dict(metric_history(self.uri, self.run_id, key)))
        except Exception:
            pass

    def latest(self) -> dict[str, float]:
        return self._latest

    def drain(self) -> dict[int, dict[str, float]]:
        """Calls run in order, so this returns once every probe queued before it has finished."""
        if self.logger:  # like the training loop's: a store restarting now still gets the last figures
            self.logger.close(retries=None)
        return self.results

    def pid(self) -> int:
        import os

        return os.getpid()


def start_probe_actor(tracking_uri: str | None, run_id: str | None, cfg: Config, name: str | None = None):
    """The probe actor of one run, with its own CPU/GPU share (probe.actor_cpus / actor_gpus) and,
    when set, the custom resources that pin it to a node (probe.actor_resources)."""
    import ray

    from trainer.tracking import FAST_FAIL_ENV

    cls = ray.remote(max_restarts=-1, max_task_retries=-1)(_ProbeActor)
    opts: dict[str, Any] = dict(num_cpus=cfg.probe.actor_cpus, num_gpus=cfg.probe.actor_gpus,
                                runtime_env={"env_vars": dict(FAST_FAIL_ENV)})
    if cfg.probe.actor_resources:  # pinned to the nodes that offer them (probe.actor_resources)
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        opts["resources"] = dict(cfg.probe.actor_resources)
        # outside any placement group: a sweep trial's group captures its children, and its bundles
        # hold no custom resources (found on the test bed: "Cannot schedule _ProbeActor with the
        # placement group ... {'bed_head': 1.0}")
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(placement_group=None)
    if name:
        opts["name"] = name
    threads = max(1, int(cfg.probe.actor_cpus)) if cfg.probe.actor_cpus >= 1 else 1
    return cls.options(**opts).remote(tracking_uri, run_id, threads, cfg.probe.max_attempts,
                                      cfg.tracking.outage_wait_s)


class ProbesLost(Exception):
    """A run's probes ended before every due checkpoint was probed; the text says why."""


class ActorProbes:
    """A run's probe actor behind the probe interface that the training loop and probes.pipeline
    use (`submit`, `latest`, `drain`, `close`; LocalProbe is the other one), so neither holds a
    Ray handle. Picklable: Ray Train hands it to its workers (the handle travels, a poll does not)."""

    def __init__(self, actor: Any):
        self.actor = actor
        self._pending: Any = None
        self._latest: dict[str, float] = {}

    def __getstate__(self) -> dict:
        return {"actor": self.actor}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["actor"])

    def submit(self, path: str, step: int) -> None:
        self.actor.probe.remote(path, step)

    def latest(self) -> dict[str, float]:
        """The actor's newest figures as of the last answer; never waits (one question in flight)."""
        import ray

        if self._pending is None:
            self._pending = self.actor.latest.remote()
        ready, _ = ray.wait([self._pending], timeout=0)
        if ready:
            try:
                self._latest = ray.get(ready[0]) or self._latest
            except Exception:  # a restarting actor: the figures known so far stand
                pass
            self._pending = None
        return self._latest

    def wait(self, timeout_s: float, stopping: Callable[[], bool] = lambda: False) -> dict[str, float]:
        """run.stop_wait: the figures once every probe submitted before this call has run (the actor
        answers its calls in order); the figures known so far past timeout_s, once `stopping()`, or
        when the actor is restarting."""
        import ray

        answer = self.actor.latest.remote()
        deadline = time.monotonic() + timeout_s
        while not stopping():
            left = deadline - time.monotonic()
            ready, _ = ray.wait([answer], timeout=max(0.0, min(1.0, left)))
            if ready:
                try:
                    self._latest = ray.get(ready[0]) or self._latest
                except Exception:  # a restarting actor: the figures known so far stand
                    pass
                break
            if left <= 0:
                break
        return self._latest

    def drain(self, timeout_s: float, unprobed: Callable[[], list[tuple[int, Path]]]) -> dict[int, dict[str, float]]:
        """Every due checkpoint probed (`unprobed()` lists those the attempts ledger still lacks),
        waited for at most timeout_s; ProbesLost past it or when the actor is gone for good."""
        import ray

        deadline = time.monotonic() + timeout_s
        try:
            while True:
                # A probe call dies with its caller: a Train worker that finished (or died) while the
                # actor was restarting takes its queued calls with it. Ask again, from the driver; done
                # steps are skipped. Calls Ray retries after a restart may run after the drain (seen:
                # the drain came back empty, the last checkpoint's probe ran after it), so drain until
                # the attempts ledger has every due checkpoint done or failed.
                for step, path in unprobed():
                    self.submit(str(path), step)
                results = ray.get(self.actor.drain.remote(), timeout=max(1.0, deadline - time.monotonic()))
                if not unprobed():
                    return results
                if time.monotonic() >= deadline:
                    break
        except ray.exceptions.GetTimeoutError:
            pass
        except ray.exceptions.RayError as err:
            raise ProbesLost(f"the probe actor failed ({err.__class__.__name__})") from None
        raise ProbesLost(f"still probing after probe.drain_timeout_s={timeout_s:g} s")

    def close(self) -> None:
        import ray

        ray.kill(self.actor)


class LocalProbe:
    """The probe actor's work on one background thread of this process, for a run trained in this
    process (`linrep train` on this machine, an in-process sweep trial) instead of a probe actor:
    a short run does not start one more process (~3 s of imports on a core that trains). Probes run
    in order while training goes on, with the same ledger, logging and retention as the actor's; a
    failed probe is reported, never raised. Same interface as ActorProbes."""

    def __init__(self, tracking_uri: str | None, run_id: str | None, cfg: Config):
        from concurrent.futures import ThreadPoolExecutor

        self.impl = _ProbeActor(tracking_uri, run_id, 0, cfg.probe.max_attempts, cfg.tracking.outage_wait_s)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="linrep-probe")

    def submit(self, path: str, step: int) -> None:
        self.pool.submit(self.impl.probe, path, step)

    def latest(self) -> dict[str, float]:
        return self.impl.latest()

    def wait(self, timeout_s: float, stopping: Callable[[], bool] = lambda: False) -> dict[str, float]:
        """run.stop_wait: the figures once every probe queued before this call has run (one thread,
        in order); the figures known so far past timeout_s or once `stopping()`."""
        from concurrent.futures import TimeoutError as FutureTimeout

        answer = self.pool.submit(self.impl.latest)
        deadline = time.monotonic() + timeout_s
        while not stopping() and time.monotonic() < deadline:
            try:
                return answer.result(timeout=max(0.01, min(1.0, deadline - time.monotonic())))
            except FutureTimeout:
                continue
        return self.impl.latest()

    def drain(self, timeout_s: float, unprobed: Callable[[], list[tuple[int, Path]]] | None = None
              ) -> dict[int, dict[str, float]]:
        """Every probe queued before this call, then the logger closed; ProbesLost past timeout_s.
        (In this process no queued call is lost with its caller: `unprobed` is not needed.)"""
        from concurrent.futures import TimeoutError as FutureTimeout

        try:
            return self.pool.submit(self.impl.drain).result(timeout=timeout_s)
        except FutureTimeout:
            raise ProbesLost(f"still probing after probe.drain_timeout_s={timeout_s:g} s") from None

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
