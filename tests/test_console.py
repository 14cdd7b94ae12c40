"""The console a user watches: `linrep train` with a pipe as stdout shows plain progress lines, the
final figures and where to browse; Ray's and libraries' messages go to the run's log file (and
MLflow); --verbose brings them back. Two short CLI runs (the second resumes the first)."""

from __future__ import annotations

import json

from tests.conftest import run_linrep
from trainer.progress import PROGRESS_MAGIC, PlainDisplay, parse_event

ARGS = ["train", "synthetic-fast", "run.checkpoint_every=50", "run.log_every=25", "probe.samples=1024",
        "data.generator_pool=1000", "model.hidden=[32,32]", "optim.warmup_steps=10", "run.name=console"]
ENV = {"LINREP_PROGRESS_EVERY_S": "0"}  # every step event becomes a line (the default: one per 10 s)
NOISE = ("PlacementGroupCleaner", "Reporting training result", "Checkpoint successfully created", "\x1b[",
         "UserWarning", PROGRESS_MAGIC.strip())


def test_console_is_progress_and_figures_ray_goes_to_the_log_verbose_shows_it(tmp_path, shared_ray):
    out = run_linrep([*ARGS, "optim.steps=100"], cwd=tmp_path, env={**shared_ray, **ENV}, timeout=600)
    console = out.stdout + out.stderr
    assert out.returncode == 0, console[-4000:]
    for noise in NOISE:
        assert noise not in console, (noise, console[-3000:])
    assert "[linrep] step 25/100" in out.stdout and "[linrep] step 100/100" in out.stdout
    assert "final probe figures" in out.stdout and "probe/r2_affine" in out.stdout
    assert "browse:" in out.stdout and "MLflow run id" in out.stdout
    log = tmp_path / "ray_results" / "console" / "linrep.log"
    assert f"log (Ray and library messages): {log}" in out.stdout
    text = log.read_text()
    assert "Reporting training result" in text and "(RayTrainWorker pid=" in text and "\x1b[" not in text

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("synthetic").experiment_id])
    assert [a.path for a in client.list_artifacts(run.info.run_id, "logs")] == ["logs/linrep.log"]

    again = run_linrep([*ARGS, "optim.steps=150", "--verbose"], cwd=tmp_path, env={**shared_ray, **ENV}, timeout=600)
    console = again.stdout + again.stderr
    assert again.returncode == 0, console[-4000:]
    assert "resumed from step 100" in console and "[linrep] step 150/150" in again.stdout
    assert "Reporting training result" in console  # Ray's lines, on the console with --verbose
    assert PROGRESS_MAGIC.strip() not in console     # progress events are still the display's
    grown = log.read_text()
    assert grown.startswith(text[:200]) and grown.count("Reporting training result") > text.count("Reporting")


def test_progress_event_round_trip_and_plain_lines(capsys):
    line = "\x1b[36m(RayTrainWorker pid=1)\x1b[0m " + PROGRESS_MAGIC + json.dumps(
        {"kind": "step", "step": 50, "total": 200, "loss": 1.5, "acc": 0.25, "samples_per_s": 1000.0,
         "probe_key": "probe/r2_affine", "probe": 0.9, "probe_step": 40})
    event = parse_event(line)
    assert event["step"] == 50 and parse_event("(RayTrainWorker pid=1) Reporting training result") is None
    import sys

    display = PlainDisplay(sys.stdout, every_s=3600)
    display.step(event)
    display.step({**event, "step": 100})   # within every_s: not printed
    display.step({**event, "step": 200})   # the last step: always printed
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("[linrep] step 50/200  loss 1.5000  acc 0.250") and "probe r2_affine 0.9000 @40" in printed[0]
    assert len(printed) == 2 and printed[1].startswith("[linrep] step 200/200")


def test_sweep_board_table_of_running_and_finished_trials():
    import io

    from trainer.progress import SweepBoard

    out = io.StringIO()
    board = SweepBoard(out, is_tty=False, every_s=0)
    step = {"kind": "step", "loss": 1.0, "acc": 0.5, "samples_per_s": 10.0, "total": 100}
    board({**step, "run": "lr=0.01-s0", "step": 50})
    board({**step, "run": "lr=0.1-s0", "step": 100, "probe_key": "probe/r2_affine", "probe": 0.95, "probe_step": 100})
    board({"kind": "note", "run": "x", "text": "ignored"})
    last = out.getvalue().split("[sweep] trials: ")[-1].splitlines()
    assert last[0] == "1 running, 1 finished" and "\x1b[" not in out.getvalue()
    assert "lr=0.01-s0  running   step 50/100" in last[1]
    assert "lr=0.1-s0   finished  step 100/100" in last[2] and "probe r2_affine 0.9500 @100" in last[2]
    # a trial that ends before its last step (run.stop_at, a scheduler, a failure) leaves "running"
    board({"kind": "trial_end", "run": "lr=0.01-s0", "status": "stopped"})
    board({"kind": "trial_end", "run": "never-stepped", "status": "failed"})      # no row: nothing to end
    last = out.getvalue().split("[sweep] trials: ")[-1].splitlines()
    assert last[0] == "0 running, 1 finished, 1 stopped" and "lr=0.01-s0  stopped   step 50/100" in last[2]
    board({**step, "run": "lr=0.01-s0", "step": 60})                              # resumed: running again
    assert out.getvalue().split("[sweep] trials: ")[-1].splitlines()[0] == "1 running, 1 finished"
