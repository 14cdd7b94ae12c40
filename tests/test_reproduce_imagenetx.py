"""`linrep reproduce imagenetx` (the paper's figure 3): the public code's statistics on known
inputs against scipy, weight files that are refused, and the whole command on fabricated
ImageNet validation images with timm's tiny models, logged to a real MLflow store."""

from __future__ import annotations

import ast
import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

from linrep.cli import main
from probes.imagenetx import drop_inactive_units, results_table, t_test_vs_chance
from probes.imagenetx.statistics import sem
from tune.reproduce_imagenetx import PAPER_SOURCES, PAPER_TARGETS, Source, bonferroni_count, footnote

pytestmark = pytest.mark.timeout(300)

ACCS = [0.61, 0.58, 0.64, 0.59, 0.62, 0.57, 0.63, 0.60, 0.58, 0.65]  # ten seeds, as the paper


# ---- the statistics, on known inputs, against scipy ------------------------------------------
def test_two_sided_t_test_matches_scipy():
    t, p = t_test_vs_chance(ACCS)
    ref = scipy.stats.ttest_1samp(ACCS, popmean=0.5)  # the public plotting.py's call (two-sided)
    assert t == pytest.approx(ref.statistic, rel=1e-12) and p == pytest.approx(ref.pvalue, rel=1e-9)
    below = [1 - a for a in ACCS]  # as far below chance: the same two-sided p
    assert t_test_vs_chance(below)[1] == pytest.approx(p, rel=1e-9)
    assert t_test_vs_chance(below, alternative="greater")[1] > 0.99


def test_sem_is_the_public_codes():
    # plotting.py: test.std(1) / sqrt(n), numpy's std (ddof=0)
    assert sem(ACCS) == pytest.approx(scipy.stats.sem(ACCS, ddof=0), rel=1e-12)
    assert sem(ACCS) == pytest.approx(np.std(ACCS) / np.sqrt(10), rel=1e-12)
    assert sem(ACCS) < scipy.stats.sem(ACCS)  # scipy's default (ddof=1) is sqrt(10/9) larger


def test_bonferroni_count_is_17_targets_by_5_sources():
    assert (PAPER_TARGETS, PAPER_SOURCES) == (17, 5)
    assert bonferroni_count(5) == 85 and bonferroni_count(3) == 85 and bonferroni_count(7) == 119
    p_values = [1e-4, 5e-4, 6e-4, 0.01, np.nan]
    frame = pd.DataFrame({"target": ["pose", "color", "shape", "style", "texture"], "acc_mean": 0.6,
                          "acc_std": 0.01, "acc_sem": 0.003, "p_value": p_values})
    table = results_table({"resnet50": frame}, tests=85)
    threshold = 0.05 / 85  # 5.88e-4
    assert (table["tests"] == 85).all()
    assert table["significant"].tolist() == [p < threshold for p in np.nan_to_num(p_values, nan=1.0)]
    assert table["significant"].tolist() == [True, True, False, False, False]
    np.testing.assert_allclose(table["p_bonferroni"][:4], np.minimum(1.0, np.array(p_values[:4]) * 85))
    # without a count: the tested pairs of this table (4), so 6e-4 passes
    assert results_table({"resnet50": frame})["significant"].tolist()[:3] == [True, True, True]


def test_units_with_mean_at_most_zero_are_dropped():
    rng = np.random.default_rng(3)
    X = np.c_[rng.random(50) + 0.1,                 # positive mean: kept
              -rng.random(50),                      # negative mean: dropped
              np.r_[np.ones(25), -np.ones(25)],     # mean exactly 0: dropped (public: > 0 kept)
              np.zeros(50),                         # dead ReLU unit: dropped
              rng.standard_normal(50) + 3.0,        # kept
              np.full(50, 2.0)]                     # positive but constant: dropped (cannot be z-scored)
    kept, dropped = drop_inactive_units(X)
    public = X.mean(0) > 0  # decode.py's rule, computed independently
    assert public.tolist() == [True, False, False, False, True, True]
    np.testing.assert_array_equal(kept, X[:, public & (X.std(0) > 0)])
    assert dropped == 4
    kept_old, dropped_old = drop_inactive_units(X, "constant")
    assert dropped_old == 2 and kept_old.shape[1] == 4


def test_footnote_names_the_count_and_why():
    def sources(n):
        return [Source(f"s{i}", "random", None) for i in range(n)]

    five = footnote(sources(5), [], 85, quick=False)
    assert "17 targets x 5 sources = 85 tests, as in the paper" in five
    three = footnote(sources(3), ["trained resnet50: skipped, no weights given"], 40, quick=False)
    assert "85 tests = 17 targets x 5 sources, the paper's count, although only 3 sources ran" in three
    assert "11 (target, source) pairs could not be tested" in three and "Left out: trained resnet50" in three
    assert "17 targets x 6 sources = 102 tests" in footnote(sources(6), [], 102, quick=True)


# ---- weight files: refused in one line, nothing in them runs ----------------------------------
class _Payload:
    """A pickle whose loading would create a folder: the classic __reduce__ attack."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _run(argv, capsys) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("kind", ["raw-pickle.pth", "torch-save.pt", "pickle.safetensors"])
def test_pickled_weights_with_a_payload_are_refused(tmp_path, capsys, kind):
    marker = tmp_path / "PWNED_MARKER"
    path = tmp_path / f"weights-{kind}"
    payload = {"fc.weight": torch.zeros(2), "evil": _Payload(marker)}
    if kind.startswith("torch-save"):
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    rc, out, err = _run(["reproduce", "imagenetx", "--quick", "--shards", str(tmp_path),
                         "--weights", f"test_resnet={path}", "--no-log"], capsys)
    assert rc == 2 and not marker.exists()
    assert len(err.strip().splitlines()) == 1 and str(path) in err
    assert ("non-tensor objects" in err) if kind != "pickle.safetensors" else ("not a readable safetensors" in err)
    assert "PWNED_MARKER" not in out + err


def test_missing_weights_file_is_one_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "resnet50.safetensors"
    rc, out, err = _run(["reproduce", "imagenetx", "--shards", str(tmp_path), "--weights",
                         f"resnet50.tv2_in1k={missing}", "--no-log"], capsys)
    assert rc == 2 and out == ""
    assert err.strip().splitlines() == [f"linrep: error: weights file {missing} does not exist "
                                        "(nothing is downloaded: give a local file)"]


@pytest.mark.parametrize("item, message", [
    ("resnet50", "expected NAME[.TAG]=PATH"),
    ("resnet18=/x.safetensors", "architecture 'resnet18' is not a source without --quick"),
    ("resnet50.nonsense_tag=/x.safetensors", "timm knows no weights 'resnet50.nonsense_tag'"),
])
def test_bad_weights_argument(tmp_path, capsys, item, message):
    rc, _, err = _run(["reproduce", "imagenetx", "--shards", str(tmp_path), "--weights", item], capsys)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


# ---- end to end ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """48 fabricated validation images with real ImageNet-X names (one corrupt), as shards."""
    from fabricate_imagenet import fabricate_imagenet

    from trainer.data.convert.imagenet import convert_imagenet

    root = tmp_path_factory.mktemp("imagenet")
    fab = fabricate_imagenet(root / "src", num_classes=4, train_per_class=1, val_per_class=12)
    convert_imagenet(fab.root, root / "shards", samples_per_shard=64, processes=1, progress=False)
    return root / "shards"


def _linrep_checkpoint(folder: Path) -> Path:
    """A linrep run folder holding one complete checkpoint of a tiny ImageNet classifier."""
    from trainer.checkpoint import CONFIG_FILE, META_FILE, make_meta
    from trainer.config import load_config
    from trainer.engine import MODEL_FILE
    from trainer.files import write_json_atomic
    from trainer.models import InputSpec, build_classifier

    cfg = load_config("synthetic-supervised", ["data.dataset=imagenet", "data.labels=imagenet",
                                               f"data.root={folder}", "data.image_size=32",
                                               "model.encoder=resnet18"])
    spec = InputSpec(channels=3, size=32)
    torch.manual_seed(0)
    model = build_classifier(cfg, spec, 2)
    ckpt = folder / "run-a" / "checkpoint_000003"
    ckpt.mkdir(parents=True)
    torch.save(model.state_dict(), ckpt / MODEL_FILE)
    (ckpt / CONFIG_FILE).write_text(cfg.to_yaml())
    meta = make_meta(3, 30, 2, spec)
    meta["files"] = {p.name: p.stat().st_size for p in ckpt.iterdir()}
    write_json_atomic(ckpt / META_FILE, meta)
    return ckpt.parent


def test_reproduce_imagenetx_quick_end_to_end(tmp_path, shards, capsys):
    import timm
    from mlflow.tracking import MlflowClient
    from safetensors.torch import save_file

    torch.manual_seed(5)  # "trained" weights: any 1000-class test_resnet, from a local safetensors file
    weights = tmp_path / "test_resnet.safetensors"
    save_file(timm.create_model("test_resnet").state_dict(), str(weights))
    run_folder = _linrep_checkpoint(tmp_path / "runs")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out_dir = tmp_path / "out"
    rc, out, err = _run(["reproduce", "imagenetx", "--quick", "--shards", str(shards), "--weights",
                         f"test_resnet={weights}", "--checkpoint", str(run_folder), "--out", str(out_dir),
                         "--workers", "0", "--device", "cpu", "--batch-size", "32", "--tracking-uri", uri], capsys)
    assert rc == 0, err[-2000:]
    assert "trained test_vit: skipped, no weights given" in err

    table = pd.read_csv(out_dir / "imagenetx_figure3.csv")
    sources = ["test_resnet", "test_resnet-random", "test_vit-random", "pixels-64", "linrep-run-a-checkpoint_000003"]
    assert list(dict.fromkeys(table["model"])) == sources and len(table) == 17 * 5
    assert (table["tests"] == 85).all()
    tested = table.dropna(subset=["acc_mean"])
    assert {"class_binary", "pose"} <= set(tested["target"])
    for row in tested.itertuples():  # every statistic recomputed from the per-seed accuracies
        accs = ast.literal_eval(row.accs)
        assert len(accs) == 3  # --quick: 3 seeds
        assert row.acc_mean == pytest.approx(np.mean(accs), abs=1e-6)
        assert row.acc_sem == pytest.approx(scipy.stats.sem(accs, ddof=0), abs=1e-6)
        # the CSV rounds accuracies to 6 decimals; no spread over seeds: NaN, as scipy's
        assert row.p_value == pytest.approx(scipy.stats.ttest_1samp(accs, 0.5).pvalue, rel=1e-4, nan_ok=True)
        assert row.significant == (row.p_value < 0.05 / 85)
    units = table.groupby("model")[["units", "dropped_units"]].first()
    assert units.loc["pixels-64"].sum() == 64 and units.loc["pixels-64", "dropped_units"] > 0  # mean <= 0 dropped

    md = (out_dir / "imagenetx_figure3.md").read_text()
    assert "| target | " + " | ".join(sources) + " |" in md
    assert "17 targets x 5 sources = 85 tests, as in the paper" in md
    assert "Left out: trained test_vit: skipped" in md and "two-sided" in md and "SEM" in md
    assert (out_dir / "imagenetx_figure3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("imagenet")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.info.run_name == "reproduce-imagenetx-quick")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and sorted(r.data.params["source"] for r in children) == sorted(sources)
    params = parent.data.params
    assert params["source.test_resnet.timm_name"] == "test_resnet.r160_in1k"
    assert params["source.test_resnet.weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert params["bonferroni_tests"] == "85" and params["seeds"] == "3"
    acc = float(table.set_index(["model", "target"]).loc[("pixels-64", "class_binary"), "acc_mean"])
    assert parent.data.metrics["probe/imagenetx/pixels-64/class_binary"] == pytest.approx(acc)
    child = next(r for r in children if r.data.params["source"] == "pixels-64")
    assert child.data.metrics["probe/imagenetx/class_binary"] == pytest.approx(acc)
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "reproduce_imagenetx")}
    assert names == {f"reproduce_imagenetx/imagenetx_figure3.{ext}" for ext in ("csv", "md", "png")}
