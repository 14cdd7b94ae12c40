"""The ImageNet-X probe's MLflow run, written through trainer.tracking's public functions."""

from __future__ import annotations

from trainer import tracking

EXPERIMENT = "imagenet"
RUN_NAME = "imagenetx-probe"
ARTIFACT_DIR = "imagenetx"


def log_probe_run(uri: str, result, params: dict[str, object]) -> str:
    """One FINISHED run in experiment 'imagenet': params (the models probed + `params`), the
    metrics of `result` (an ImagenetXResult) at step 0 and its tables and plot under imagenetx/."""
    exp_id = tracking.ensure_experiment(uri, EXPERIMENT)
    run_id = tracking.create_run(uri, exp_id, RUN_NAME,
                                 tags={"linrep.kind": RUN_NAME, "linrep.git_commit": tracking.git_commit() or ""})
    tracking.log_params(uri, run_id, {"models": ",".join(result.found), **params})
    logger = tracking.MetricLogger(uri, run_id, flush_every_s=0)
    logger.log(result.metrics, step=0)
    logger.close()
    for path in result.artifacts:
        tracking.log_artifact(uri, run_id, path, ARTIFACT_DIR)
    tracking.set_status(uri, run_id, "FINISHED")
    return run_id
