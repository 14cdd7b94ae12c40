"""The paper's headline figures (PAPER.md 4.1), reached by the real `linrep train` runs of the
presets on this 2-core CPU: the proof that the science works. Slow: skipped by `make test-fast`."""

from __future__ import annotations

import pytest

from tests.conftest import run_linrep


def final_figures(tmp_path, experiment: str) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])[0]
    assert run.info.status == "FINISHED"
    last = {}
    for key in ("probe/r2_affine", "probe/r2_linear", "probe/sv_mae", "probe/r2_w", "probe/r2_g"):
        hist = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        last[key] = hist[-1][1]
    return last


@pytest.mark.slow
def test_supervised_recovers_the_latents_linearly(tmp_path):
    out = run_linrep(["train", "synthetic-supervised"], cwd=tmp_path, timeout=1200)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    figs = final_figures(tmp_path, "synthetic")
    print("supervised d=5 |C|=100 κ=10:", figs)
    assert figs["probe/r2_affine"] >= 0.99          # paper: 0.998 after far longer training
    assert figs["probe/r2_g"] < figs["probe/r2_affine"] - 0.1  # far better than the raw observations


@pytest.mark.slow
def test_diet_recovers_latents_and_cluster_vectors_case_c1(tmp_path):
    out = run_linrep(["train", "synthetic-diet"], cwd=tmp_path, timeout=1500)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    figs = final_figures(tmp_path, "synthetic")
    print("DIET N=1000 d=5 |C|=100 κ=10 C1:", figs)
    assert figs["probe/r2_affine"] >= 0.98          # paper: 0.986
    assert figs["probe/r2_w"] >= 0.99               # paper: 0.999
    assert figs["probe/sv_mae"] <= 0.05             # paper: ~0.01
