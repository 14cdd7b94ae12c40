"""End to end through the MLflow UI: `mlflow server` on 127.0.0.1, a small sweep logged to it over
http, then headless Chromium (Debian's chromium + chromedriver, driven by Selenium) finds the
sweep's parent run, its child runs and the summary plot among the parent run's artifacts, then
opens the best child run as its users browse a run: its logged and registered model, its dataset,
a metrics chart, its system metrics and its probe plot among its artifacts. (One sweep for both:
each `linrep` command and server start costs ~100 s of the suite.)

Screenshots of every step land in the test's tmp folder (kept by pytest) for debugging."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_linrep

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SWEEP = "browse"
CHILDREN = ["browse-C10-s0", "browse-C20-s0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` bound to 127.0.0.1 (sqlite store, proxied artifacts); stopped at the end."""
    port = free_port()
    (tmp_path / "server").mkdir()
    log = open(tmp_path / "mlflow-server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}",
         "--artifacts-destination", str(tmp_path / "server" / "artifacts")],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "mlflow-server.log").read_text()[-2000:]
            assert time.time() < deadline, "mlflow server did not answer /health within 120 s"
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


def make_driver(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("Debian's chromium and chromium-driver are needed (.ci/run installs them: "
                    "apt-get install -y chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", f"--user-data-dir={profile}", "--window-size=1600,1000"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def test_mlflow_ui_shows_the_sweep_its_children_and_its_best_runs_model_dataset_and_plots(tmp_path, mlflow_server,
                                                                                        shared_ray):
    spec = {"name": SWEEP, "base": "synthetic-supervised", "classes": [10, 20], "seeds": 1, "max_concurrent": 2,
            "overrides": {"optim.steps": 100, "optim.warmup_steps": 10, "run.checkpoint_every": 50,
                          "run.log_every": 25, "model.hidden": [32, 32], "data.generator_pool": 500,
                          "probe.samples": 1024, "tracking.system_metrics_s": 1,
                          "tracking.register_model": "browse-classifier"}}
    (tmp_path / "browse.yaml").write_text(yaml.safe_dump(spec))
    out = run_linrep(["sweep", str(tmp_path / "browse.yaml")], cwd=tmp_path, timeout=900,
                     env={**shared_ray, "MLFLOW_TRACKING_URI": mlflow_server})
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert not (tmp_path / "mlruns").exists()  # everything went to the server

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    (parent,) = client.search_runs([client.get_experiment_by_name("synthetic").experiment_id],
                                   filter_string=f"tags.`linrep.role` = 'sweep'")
    best = client.get_run(parent.data.tags["linrep.best_child_run_id"])
    # the sweep logged (and registered) the best child's models, no other trial's
    models = client.search_logged_models([best.info.experiment_id])
    assert {m.source_run_id for m in models} == {best.info.run_id} and "final" in {m.name for m in models}
    (version,) = client.search_model_versions("name = 'browse-classifier'")
    assert version.run_id == best.info.run_id and version.version == "1"
    dataset = best.inputs.dataset_inputs[0].dataset
    assert dataset.name.startswith("synthetic-d") and dataset.source_type == "synthetic"

    driver = make_driver(tmp_path / "chrome-profile")
    try:
        page = Page(driver, tmp_path)
        browse_sweep(page, mlflow_server)
        browse_run(page, mlflow_server, best.info.experiment_id, best.info.run_id, dataset.name)
    finally:
        driver.quit()


class Page:
    """The browser and what every step uses: a wait, text locators, numbered screenshots (one
    sequence across pages, in the test's tmp folder)."""

    def __init__(self, driver, shots: Path, timeout: float = 60):
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.shots = driver, shots
        self.wait = WebDriverWait(driver, timeout)
        self._count = iter(range(1, 1000))

    def screenshot(self, name: str) -> None:
        self.driver.save_screenshot(str(self.shots / f"ui-{next(self._count):02d}-{name}.png"))

    @staticmethod
    def by_text(text: str):
        from selenium.webdriver.common.by import By

        return (By.XPATH, f"//*[normalize-space(text())='{text}']")

    @staticmethod
    def containing(text: str):
        from selenium.webdriver.common.by import By

        return (By.XPATH, f"//*[contains(normalize-space(text()), '{text}')]")

    def click_text(self, text: str) -> None:
        from selenium.webdriver.support import expected_conditions as EC

        self.wait.until(EC.element_to_be_clickable(self.by_text(text))).click()


def browse_sweep(page: "Page", url: str) -> None:
    """Experiments page -> runs table -> parent run -> its children -> its artifacts -> the plot."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    driver, wait = page.driver, page.wait
    screenshot, by_text, click_text = page.screenshot, page.by_text, page.click_text

    try:
        # 1. the experiments page lists the study's experiment; open its runs in the model-training view
        #    (MLflow 3 opens experiments in its GenAI view unless that toggle says otherwise)
        driver.get(url + "/#/experiments")
        wait.until(EC.presence_of_element_located((By.LINK_TEXT, "synthetic")))
        screenshot("experiments")
        click_text("Model training")
        driver.find_element(By.LINK_TEXT, "synthetic").click()
        parent_link = wait.until(EC.element_to_be_clickable((By.LINK_TEXT, SWEEP)))
        screenshot("runs")
        # 2. the parent run is the only top-level run; expanding it shows the child runs
        shown = [a.text for a in driver.find_elements(By.CSS_SELECTOR, "a[href*='/runs/']")]
        assert SWEEP in shown and not set(CHILDREN) & set(shown), shown
        cell = parent_link.find_element(By.XPATH, "./ancestor::div[contains(@class,'ag-cell-wrapper')][1]")
        cell.find_element(By.CSS_SELECTOR, "button").click()
        for child in CHILDREN:
            wait.until(EC.presence_of_element_located((By.LINK_TEXT, child)))
        screenshot("children")
        # 3. the parent run's artifacts hold the summary and its plots; the plot renders as an image
        driver.find_element(By.LINK_TEXT, SWEEP).click()
        wait.until(EC.url_contains("/runs/"))
        click_text("Artifacts")
        click_text("summary")
        wait.until(EC.presence_of_element_located(by_text("summary.md")))
        click_text("plots")
        wait.until(EC.presence_of_element_located(by_text("r2_vs_num_classes.png")))
        click_text("learning_curves.png")
        image = wait.until(lambda d: next((img for img in d.find_elements(By.TAG_NAME, "img")
                                           if (img.get_attribute("src") or "").startswith("blob:")
                                           and int(img.get_attribute("naturalWidth") or 0) > 300), False))
        screenshot("summary-plot")
        assert int(image.get_attribute("naturalWidth")) == 792  # the PNG summary.py wrote (7.2 in x 110 dpi)
    except Exception:
        screenshot("failure")
        raise


def browse_run(page: "Page", url: str, experiment_id: str, run_id: str, dataset: str) -> None:
    """Run page -> its dataset and logged model -> the metrics charts -> the plot among its artifacts."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    driver, wait = page.driver, page.wait
    screenshot, by_text, containing, click_text = page.screenshot, page.by_text, page.containing, page.click_text

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
