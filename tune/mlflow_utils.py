"""The few MLflow calls a sweep needs beyond trainer.tracking: its parent run and its child runs.

mlflow is imported lazily, through trainer.tracking's client. A sweep's parent run is found by
its tags (linrep.sweep = name, linrep.role = sweep); a child run by mlflow.parentRunId, and it is
the trainer's own run of the trial (tag linrep.run_key = the trial key).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trainer import tracking

SWEEP_TAG = "linrep.sweep"
ROLE_TAG = "linrep.role"
PARENT_TAG = "mlflow.parentRunId"


@dataclass
class ChildRun:
    run_id: str
    key: str
    status: str
    metrics: dict[str, float]
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


def _client(uri: str):
    return tracking._client(uri)


def run_exists(uri: str, run_id: str) -> bool:
    try:
        _client(uri).get_run(run_id)
        return True
    except Exception:
        return False


def find_parent(uri: str, experiment_id: str, sweep: str) -> str | None:
    """The parent run of sweep `sweep` in this experiment (the oldest, should there be several)."""
    runs = _client(uri).search_runs(
        [experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.`{ROLE_TAG}` = 'sweep'",
        order_by=["attributes.start_time ASC"], max_results=10)
    return runs[0].info.run_id if runs else None


def create_parent(uri: str, experiment_id: str, sweep: str, tags: dict[str, str]) -> str:
    run = _client(uri).create_run(experiment_id, run_name=sweep,
                                  tags={SWEEP_TAG: sweep, ROLE_TAG: "sweep", "mlflow.runName": sweep, **tags})
    return run.info.run_id


def set_status(uri: str, run_id: str, status: str) -> None:
    """RUNNING reopens a run (a resumed sweep); FINISHED / FAILED / KILLED end it."""
    client = _client(uri)
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status=status)


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    client = _client(uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))


def log_params(uri: str, run_id: str, params: dict[str, str]) -> None:
    """Log params not yet on the run (MLflow refuses to change a logged param)."""
    from mlflow.entities import Param

    client = _client(uri)
    have = client.get_run(run_id).data.params
    new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in have]
    for i in range(0, len(new), 100):
        client.log_batch(run_id, params=new[i:i + 100])


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    _client(uri).log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])


def child_runs(uri: str, experiment_id: str, parent_run_id: str) -> list[ChildRun]:
    """Every child run of a sweep's parent run (all pages)."""
    client = _client(uri)
    out, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                                  max_results=1000, page_token=token)
        for r in page:
            out.append(ChildRun(r.info.run_id, r.data.tags.get(tracking.RUN_KEY_TAG, r.info.run_name),
                                r.info.status, dict(r.data.metrics), dict(r.data.params), dict(r.data.tags)))
        token = page.token
        if not token:
            return out


def experiment_id(uri: str, name: str) -> str:
    return tracking.ensure_experiment(uri, name)
