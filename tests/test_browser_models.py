"""A training run as its users browse it in the MLflow UI: one short `linrep train` logged over http
to a real `mlflow server` on 127.0.0.1, then headless Chromium opens the run and finds its logged
model, its dataset, a metrics chart, its system metrics and its probe plot among the artifacts.

Reuses tests/test_browser.py's server fixture and Chromium driver. Screenshots of every step land in
the test's tmp folder (kept by pytest) for debugging."""

from __future__ import annotations

import re

import pytest

from tests.conftest import run_linrep
from tests.test_browser import make_driver, mlflow_server  # noqa: F401  (a fixture, used by name)

pytestmark = pytest.mark.browser

RUN_ARGS = ["optim.steps=60", "optim.warmup_steps=10", "run.checkpoint_every=30", "run.log_every=15",
            "model.hidden=[32,32]", "data.num_classes=10", "data.generator_pool=500", "probe.samples=1024",
            "tracking.system_metrics_s=1", "tracking.register_model=browse-classifier", "run.seed=0"]


def test_mlflow_ui_shows_a_runs_model_dataset_metrics_and_plot(tmp_path, mlflow_server):  # noqa: F811
    out = run_linrep(["train", "synthetic-fast", *RUN_ARGS], cwd=tmp_path, timeout=600,
                     env={"MLFLOW_TRACKING_URI": mlflow_server})
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    run_id = re.search(r"MLflow run id: ([0-9a-f]{32})", out.stdout).group(1)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    models = client.search_logged_models([run.info.experiment_id])
    assert {m.name for m in models} >= {"final"}, models
    (version,) = client.search_model_versions("name = 'browse-classifier'")
    assert version.run_id == run_id and version.version == "1"
    dataset = run.inputs.dataset_inputs[0].dataset
    assert dataset.name == "synthetic-d5-C10" and dataset.source_type == "synthetic"

    driver = make_driver(tmp_path / "chrome-profile")
    try:
        browse_run(driver, mlflow_server, run.info.experiment_id, run_id, dataset.name, tmp_path)
    finally:
        driver.quit()


def browse_run(driver, url: str, experiment_id: str, run_id: str, dataset: str, shots) -> None:
    """Run page -> its dataset and logged model -> the metrics charts -> the plot among its artifacts."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 45)
    counter = iter(range(1, 100))

    def screenshot(name: str) -> None:
        driver.save_screenshot(str(shots / f"ui-{next(counter):02d}-{name}.png"))

    def by_text(text: str):
        return (By.XPATH, f"//*[normalize-space(text())='{text}']")

    def containing(text: str):
        return (By.XPATH, f"//*[contains(normalize-space(text()), '{text}')]")

    def click_text(text: str) -> None:
        wait.until(EC.element_to_be_clickable(by_text(text))).click()

    try:
        # 1. the run's overview: its dataset (name, digest) and its logged model
        driver.get(f"{url}/#/experiments/{experiment_id}/runs/{run_id}")
        wait.until(EC.presence_of_element_located(containing(dataset)))       # Datasets: name (digest)
        wait.until(EC.presence_of_element_located(by_text("browse-classifier")))  # Registered models
        model_links = [a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "a[href*='/models/m-']")]
        assert model_links, "no link to a logged model on the run page"
        screenshot("overview")
        # 2. the metrics charts: the training loss, and the system metrics in their own section
        click_text("Model metrics")  # charts grouped by prefix ("probe" first); legends name the full key
        wait.until(EC.presence_of_element_located(containing("(probe/r2_affine)")))
        assert driver.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")
        screenshot("metrics")
        click_text("System metrics")
        wait.until(EC.presence_of_element_located(containing("cpu_utilization_percentage")))
        screenshot("system-metrics")
        # 3. the artifacts: the probe curve renders as an image (the PNG model_logging wrote)
        click_text("Artifacts")
        click_text("plots")
        click_text("probe_curve.png")
        image = wait.until(lambda d: next((img for img in d.find_elements(By.TAG_NAME, "img")
                                           if (img.get_attribute("src") or "").startswith("blob:")
                                           and int(img.get_attribute("naturalWidth") or 0) > 300), False))
        screenshot("probe-plot")
        assert int(image.get_attribute("naturalWidth")) == 640  # 6.4 in x 100 dpi (log_figure's default)
        # 4. the logged model's own page: its name and the run it came from
        driver.get(model_links[0])
        wait.until(EC.presence_of_element_located(by_text("final")))
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, f"a[href*='{run_id}']")))
        screenshot("logged-model")
    except Exception:
        screenshot("failure")
        raise
