"""ImageNet-X probe: batched logistic regression vs scikit-learn, splits, t-test + Bonferroni, the
join with the real annotations, feature extractors, and the whole run on converted shards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import ttest_1samp

from probes.imagenetx import (
    FACTORS,
    TARGETS,
    create_extractor,
    join_features,
    load_imagenetx_annotations,
    parse_model_spec,
    plot_factor_accuracies,
    probe_features,
    results_table,
    roc_auc,
    run_imagenetx_probe,
    t_test_vs_chance,
    write_tables,
)
from probes.logistic import (
    balanced_stratified_split,
    bench_logistic,
    decision_function_batched,
    fit_logistic_batched,
    fit_problems_batched,
    fit_problems_sklearn,
    make_probe_problems,
    standardize_stats,
    weights_from_index,
)
from trainer.errors import UserError

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def annotations() -> pd.DataFrame:
    return load_imagenetx_annotations()


# ---- batched logistic regression ----------------------------------------------------------------
def test_batched_logistic_matches_sklearn_solution():
    """Same objective as LogisticRegression(C=1): coefficients agree on z-scored training rows."""
    from sklearn.linear_model import LogisticRegression

    X, Y, problems = make_probe_problems(600, 24, targets=4, seeds=2, seed=1)
    X = X.astype(np.float64)
    Xt = torch.as_tensor(X)
    train = weights_from_index([tr for _, tr, _ in problems], len(X), Xt)
    labels = torch.as_tensor(Y[[t for t, _, _ in problems]], dtype=torch.float64)
    center, scale = standardize_stats(Xt, train)
    fit = fit_logistic_batched(Xt, labels, sample_weight=train, center=center, scale=scale, tol=1e-8, ftol=0)
    assert fit.converged.all()
    for m, (t, tr, _) in enumerate(problems):
        mean, std = X[tr].mean(0), X[tr].std(0)
        ref = LogisticRegression(C=1.0, tol=1e-10, max_iter=5000).fit((X[tr] - mean) / std, Y[t, tr])
        np.testing.assert_allclose(fit.weight[m].numpy(), ref.coef_[0], atol=2e-4, rtol=2e-3)
        assert abs(float(fit.bias[m]) - ref.intercept_[0]) < 2e-4


def test_batched_logistic_accuracy_within_half_a_percent_of_sklearn():
    X, Y, problems = make_probe_problems(1500, 64, targets=17, seeds=2, seed=2)
    sizes = np.array([len(te) for _, _, te in problems])
    ours = fit_problems_batched(X.astype(np.float64), Y, problems, dtype=torch.float64, tol=1e-6)
    ref = fit_problems_sklearn(X.astype(np.float64), Y, problems, tol=1e-6)
    assert np.abs(ours - ref).max() <= 0.005
    # Default (float32, tol 1e-4, as scikit-learn's default tol): both solvers stop near the flat
    # optimum at slightly different points, so a borderline test point may flip in a problem; the
    # per-target means over seeds (what the probe reports) agree within 0.5 %.
    fast = fit_problems_batched(X, Y, problems)
    targets = np.array([t for t, _, _ in problems])
    per_target = [abs(fast[targets == t].mean() - ref[targets == t].mean()) for t in np.unique(targets)]
    assert max(per_target) <= 0.005 and np.abs(fast - ref).mean() <= 0.005
    assert np.all(np.abs(fast - ref) * sizes <= 2 + 1e-6)  # at most 2 test points differ per problem


def test_batched_logistic_per_problem_matrices_and_errors():
    rng = np.random.default_rng(0)
    X = torch.as_tensor(rng.standard_normal((3, 50, 6)))
    y = (X[..., 0] + 0.3 * torch.as_tensor(rng.standard_normal((3, 50))) > 0).double()
    per_problem = fit_logistic_batched(X, y, tol=1e-9)
    for m in range(3):  # the shared-X path on each matrix alone gives the same solution
        alone = fit_logistic_batched(X[m], y[m:m + 1], tol=1e-9)
        torch.testing.assert_close(per_problem.weight[m], alone.weight[0], atol=1e-5, rtol=1e-4)
    logits = decision_function_batched(X, per_problem)
    assert logits.shape == (3, 50)
    with pytest.raises(UserError, match="do not match"):
        fit_logistic_batched(X[0], y[:, :40])
    with pytest.raises(UserError, match="problem 1 has no training samples"):
        fit_logistic_batched(X[0], y[:2], sample_weight=torch.stack([torch.ones(50), torch.zeros(50)]).double())


def test_bench_logistic_small_agrees():
    out = bench_logistic(n=800, p=64, targets=3, seeds=2, verbose=False)
    assert out["problems"] == 6 and set(out["times"]) == {"batched", "sklearn"}
    assert out["ratio"] > 0 and out["max_acc_diff"] <= 0.05


# ---- protocol pieces --------------------------------------------------------------------------------
def test_balanced_stratified_split():
    y = np.r_[np.ones(40, int), np.zeros(160, int)]
    train, test = balanced_stratified_split(y, test_size=0.3, seed=3)
    assert len(np.intersect1d(train, test)) == 0
    assert y[train].sum() == 28 and (y[train] == 0).sum() == 28  # balanced, 70 %
    assert y[test].sum() == 12 and (y[test] == 0).sum() == 12  # balanced, 30 %
    again = balanced_stratified_split(y, test_size=0.3, seed=3)
    other = balanced_stratified_split(y, test_size=0.3, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip((train, test), again))
    assert not np.array_equal(train, other[0])
    with pytest.raises(UserError, match="1 positive"):
        balanced_stratified_split(np.r_[1, np.zeros(10, int)], seed=0)


def test_t_test_against_chance():
    accs = [0.55, 0.58, 0.52, 0.57, 0.56]
    t, p = t_test_vs_chance(accs)  # two-sided by default, as the public plotting.py
    ref = ttest_1samp(accs, 0.5)
    assert t == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
    t1, p1 = t_test_vs_chance(accs, alternative="greater")
    assert p1 == pytest.approx(ttest_1samp(accs, 0.5, alternative="greater").pvalue) and p1 == pytest.approx(p / 2)
    assert t_test_vs_chance([0.45, 0.47, 0.44], alternative="greater")[1] > 0.9  # below chance: not significant
    assert t_test_vs_chance([0.45, 0.47, 0.44])[1] < 0.05  # ... but two-sided it differs from chance
    # No spread: what scipy answers for exactly equal values, whatever the rounding of its mean
    for flat in ([0.75] * 3, [0.25] * 4, [0.5] * 3):
        for alternative in ("two-sided", "greater"):
            ref = ttest_1samp(flat, 0.5, alternative=alternative)
            assert t_test_vs_chance(flat, alternative=alternative)[1] == pytest.approx(ref.pvalue, nan_ok=True)
    assert ttest_1samp([0.8] * 3, 0.5).pvalue > 0 and t_test_vs_chance([0.8] * 3)[1] == 0.0  # rounding noise
    assert np.isnan(t_test_vs_chance([0.7])[1])
    with pytest.raises(UserError, match="alternative 'less'"):
        t_test_vs_chance(accs, alternative="less")


def test_bonferroni_over_targets_and_models():
    def model(p_values):
        return pd.DataFrame({"target": ["pose", "color"], "acc_mean": [0.6, 0.55], "acc_std": [0.01, 0.02],
                             "auc_mean": [0.6, 0.5], "auc_std": [0.0, 0.0], "t": [3.0, 2.0], "p_value": p_values})

    table = results_table({"a": model([0.001, 0.02]), "b": model([0.013, np.nan])}, alpha=0.05)
    assert (table["tests"] == 3).all()  # the NaN (untestable) row is not counted
    # alpha / 3 = 0.0167: 0.001 and 0.013 pass, 0.02 would pass uncorrected but not here.
    assert table["significant"].tolist() == [True, False, True, False]
    assert table["p_bonferroni"].tolist()[:3] == pytest.approx([0.003, 0.06, 0.039])


def test_roc_auc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(labels + rng.standard_normal(200), 1)  # with ties
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))


# ---- the real annotations and the join ----------------------------------------------------------------
def test_real_annotations(annotations):
    """Defaults = imagenet_x.load_annotations()'s (the public code's): top factor, prototypes filtered,
    the class split at its mean."""
    from imagenet_x import load_annotations

    reference = load_annotations()
    assert len(annotations) == len(reference) == 46110
    assert list(annotations.columns) == ["key", "class", *FACTORS, "class_binary"]
    assert annotations["key"].is_unique and annotations["key"].str.match(r"^ILSVRC2012_val_\d{8}$").all()
    assert annotations["key"].tolist() == [Path(f).stem for f in reference["file_name"]]
    assert set(np.unique(annotations[list(FACTORS)].to_numpy())) == {0, 1}
    assert (annotations[list(FACTORS)].sum(axis=1) <= 1).all()  # the top factor only
    mean_class = reference["class"].mean()
    assert 497 < mean_class < 498  # so class_binary is class >= 498 here, not >= 500
    assert annotations["class_binary"].tolist() == (reference["class"] > mean_class).astype(int).tolist()
    multi = load_imagenetx_annotations("multi", filter_prototypes=False, class_split="500")
    assert len(multi) == 48868  # every annotated validation image ("~49k")
    assert (multi[list(FACTORS)].sum(axis=1) > 1).any()
    assert multi["class_binary"].tolist() == (multi["class"] >= 500).astype(int).tolist()
    with pytest.raises(UserError, match="class_split='median'"):
        load_imagenetx_annotations(class_split="median")


def test_join_with_real_annotations(annotations):
    row = annotations.iloc[[10, 20, 30]]
    keys = ["n01440764_10026", row["key"].iloc[0] + ".JPEG", row["key"].iloc[1], "ILSVRC2012_val_99999999",
            row["key"].iloc[2]]
    feats = np.arange(len(keys) * 2, dtype=np.float32).reshape(len(keys), 2)
    X, Y, found = join_features(keys, feats, annotations)
    assert found == 3
    np.testing.assert_array_equal(X, feats[[1, 2, 4]])  # annotated rows, in key order
    assert Y["key"].tolist() == row["key"].tolist()
    assert Y[list(TARGETS)].to_numpy().tolist() == row[list(TARGETS)].to_numpy().tolist()
    with pytest.raises(UserError, match="occurs 2 times"):
        join_features([keys[1], keys[1]], feats[:2], annotations)


def test_probe_finds_encoded_factors(annotations):
    """Features that linearly encode pose and the class (+ a dead unit): those two decode well and
    significantly; a random target, independent of the features, stays at chance."""
    rng = np.random.default_rng(0)
    Y = annotations.iloc[:4000].reset_index(drop=True)
    Y["noise"] = rng.integers(0, 2, len(Y))
    signal = np.c_[Y["pose"], Y["class_binary"]].astype(np.float32) * 2.0
    X = np.c_[signal + rng.standard_normal((len(Y), 2)), rng.standard_normal((len(Y), 6)), np.zeros(len(Y))]
    X[:, -2] = np.abs(X[:, -2])  # a positive unit among the noise: kept, the others' means decide
    table = probe_features(X.astype(np.float32), Y, seeds=4, targets=["pose", "class_binary", "noise", "brighter"],
                           unit_rule="constant")
    assert table.attrs["dropped_units"] == 1 and table.attrs["units"] == 8
    expected_kept = int((X[:, :8].mean(0) > 0).sum())
    public = probe_features(X.astype(np.float32), Y, seeds=2, targets=["pose"])  # default: mean <= 0 dropped
    assert public.attrs["units"] == expected_kept and public.attrs["dropped_units"] == 9 - expected_kept
    rows = table.set_index("target")
    assert rows.loc["pose", "acc_mean"] > 0.8 and rows.loc["class_binary", "acc_mean"] > 0.8
    assert rows.loc["pose", "auc_mean"] > 0.85
    assert abs(rows.loc["noise", "acc_mean"] - 0.5) < 0.05
    assert len(rows.loc["pose", "accs"]) == 4
    summary = results_table({"toy": table})
    sig = summary.set_index("target")["significant"]
    assert sig["pose"] and sig["class_binary"] and not sig["noise"]
    # ~9 positive 'brighter' images among 4000: probed (small) or skipped with a note, never an error.
    assert rows.loc["brighter", "n_pos"] == int(Y["brighter"].sum())


def test_tables_and_plot(tmp_path):
    frame = pd.DataFrame({"target": list(TARGETS), "acc_mean": np.linspace(0.5, 0.9, 17), "acc_std": 0.01, "acc_sem": 0.01,
                          "auc_mean": 0.7, "auc_std": 0.01, "t": 5.0, "p_value": np.r_[0.5, np.full(16, 1e-6)]})
    table = results_table({"resnet50": frame, "pixels-2048": frame.assign(acc_mean=0.5, p_value=0.6)})
    csv_path, md_path = write_tables(table, tmp_path)
    back = pd.read_csv(csv_path)
    assert len(back) == 34 and back["significant"].sum() == 16
    md = md_path.read_text()
    assert "| target | resnet50 | pixels-2048 |" in md and "0.900 ± 0.010*" in md and "alpha 0.05 / 34" in md
    assert "two-sided" in md and "SEM" in md
    png = plot_factor_accuracies(table, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, no leftovers


# ---- feature extractors ------------------------------------------------------------------------------------
def test_model_specs():
    spec = parse_model_spec("pixels:64,size=16,seed=3")
    assert (spec.kind, spec.arg, spec.option("size"), spec.label) == ("pixels", "64", "16", "pixels-64")
    assert parse_model_spec("timm_random:resnet50").label == "resnet50-random"
    assert parse_model_spec("timm:vit_base_patch16_224,label=ViT B/16 (in1k)").label == "ViT_B_16_in1k"
    with pytest.raises(UserError, match="unknown kind 'sklearn'"):
        parse_model_spec("sklearn:x")
    with pytest.raises(UserError, match="not key=value"):
        parse_model_spec("pixels:8,size")
    with pytest.raises(UserError, match="timm has no model 'resnet_does_not_exist'"):
        create_extractor("timm_random:resnet_does_not_exist")


def test_pixel_projection_is_seeded():
    images = torch.randn(4, 3, 16, 16)
    a = create_extractor("pixels:32,size=16", seed=0).features(images)
    b = create_extractor("pixels:32,size=16", seed=0).features(images)
    c = create_extractor("pixels:32,size=16", seed=1).features(images)
    assert a.shape == (4, 32) and torch.equal(a, b) and not torch.allclose(a, c)
    assert 0.3 < float(a.std()) < 3.0  # unit-scale features


def test_timm_extractors(tmp_path):
    import timm

    random_a = create_extractor("timm_random:test_resnet", seed=0)
    random_b = create_extractor("timm_random:test_resnet", seed=0)
    images = torch.randn(2, 3, 160, 160)
    fa = random_a.features(images)
    assert fa.dim() == 2 and torch.equal(fa, random_b.features(images))
    # Pretrained weights from a local file (no network): a 1000-class classifier's pooled features.
    from safetensors.torch import save_file

    torch.manual_seed(7)
    reference = timm.create_model("test_resnet", pretrained=False).eval()
    torch.save(reference.state_dict(), tmp_path / "w.pth")
    save_file(reference.state_dict(), str(tmp_path / "w.safetensors"))
    pooled = reference.forward_head(reference.forward_features(images), pre_logits=True)
    for name in ("w.pth", "w.safetensors"):
        loaded = create_extractor(f"timm:test_resnet,file={tmp_path / name}")
        torch.testing.assert_close(loaded.features(images), pooled)
    headless = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    torch.save(headless.state_dict(), tmp_path / "headless.pth")
    with pytest.raises(UserError, match="does not fit timm's test_resnet with a 1000-class head"):
        create_extractor(f"timm:test_resnet,file={tmp_path / 'headless.pth'}")


def test_timm_pretrained_unavailable_is_a_user_error():
    code = ("from probes.imagenetx import create_extractor\n"
            "from trainer.errors import UserError\n"
            "try:\n    create_extractor('timm:test_resnet')\n"
            "except UserError as e:\n    print('USERERROR', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert "USERERROR timm model 'test_resnet': pretrained weights cannot be loaded" in out.stdout, out.stderr[-500:]


def test_checkpoint_extractor(tmp_path):
    from trainer.checkpoint import CONFIG_FILE, META_FILE, make_meta
    from trainer.files import write_json_atomic
    from trainer.config import load_config
    from trainer.engine import MODEL_FILE
    from trainer.models import InputSpec, build_classifier

    cfg = load_config("synthetic-supervised", ["data.dataset=imagenet", "data.labels=imagenet",
                                               f"data.root={tmp_path}", "data.image_size=32",
                                               "model.encoder=resnet18"])
    spec = InputSpec(channels=3, size=32)
    model = build_classifier(cfg, spec, 2)
    ckpt = tmp_path / "checkpoint_000001"
    ckpt.mkdir()
    torch.save(model.state_dict(), ckpt / MODEL_FILE)
    (ckpt / CONFIG_FILE).write_text(cfg.to_yaml())
    write_json_atomic(ckpt / META_FILE, make_meta(1, 10, 2, spec))
    extractor = create_extractor(f"checkpoint:{ckpt}")
    assert extractor.label == "checkpoint-checkpoint_000001"
    from PIL import Image

    image = extractor.transform(Image.new("RGB", (40, 50), (120, 10, 200)))
    assert image.shape == (3, 32, 32)
    feats = extractor.features(image[None].repeat(2, 1, 1, 1))
    torch.testing.assert_close(feats, model.eval().encoder(image[None].repeat(2, 1, 1, 1)))


# ---- the whole run on converted shards -------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A fabricated ImageNet (6 classes on both sides of 500, 96 real ImageNet-X validation names,
    one corrupt) converted to shards once for the tests below."""
    from fabricate_imagenet import fabricate_imagenet

    from trainer.data.convert.imagenet import convert_imagenet

    root = tmp_path_factory.mktemp("imagenet")
    fab = fabricate_imagenet(root / "src", num_classes=6, train_per_class=1, val_per_class=16)
    convert_imagenet(fab.root, root / "shards", samples_per_shard=40, processes=1, progress=False)
    return fab, root / "shards"


def annotated_good_val(fab, annotations) -> int:
    """Fabricated val images that survived conversion (one is corrupt) and are in the default
    annotations (the fabricator draws from every annotated image; the default drops prototypes)."""
    good = {Path(k).stem for k in fab.val_labels} - {Path(p).stem for p in fab.corrupt}
    return len(good & set(annotations["key"]))


def test_run_imagenetx_probe_on_converted_shards(tmp_path, capfd, converted, annotations):
    fab, shards = converted
    result = run_imagenetx_probe(shards, ["pixels:48,size=32", "timm_random:test_resnet"],
                                 out_dir=tmp_path / "out", batch_size=16, seeds=3, loader_workers=1,
                                 save_features=True)
    good_val = annotated_good_val(fab, annotations)
    assert 60 <= good_val < len(fab.val_labels)  # one corrupt image skipped, prototypes filtered
    assert result.found == {"pixels-48": good_val, "test_resnet-random": good_val}
    assert result.annotated == 46110
    assert f"{good_val} of 46,110 annotated images found" in capfd.readouterr().err
    table = result.table
    assert set(table["model"]) == {"pixels-48", "test_resnet-random"} and len(table) == 2 * len(TARGETS)
    probed = table.dropna(subset=["acc_mean"])
    assert "class_binary" in set(probed["target"])  # classes on both sides of 500
    assert (probed["n_test"] >= 2).all() and probed["acc_mean"].between(0, 1).all()
    assert table.loc[table["acc_mean"].isna(), "note"].str.contains("need >= 2 of each").all()
    assert result.metrics["probe/imagenetx/pixels-48/class_binary"] == pytest.approx(
        float(probed.set_index(["model", "target"]).loc[("pixels-48", "class_binary"), "acc_mean"]))
    assert result.metrics["probe/imagenetx/test_resnet-random/found_images"] == good_val
    assert [p.name for p in result.artifacts] == ["imagenetx_probe.csv", "imagenetx_probe.md", "imagenetx_probe.png"]
    assert all(p.is_file() for p in result.artifacts)
    saved = np.load(tmp_path / "out" / "features-pixels-48.npz")
    assert saved["features"].shape[0] == good_val and set(saved["keys"]) <= set(fab.val_labels)


def test_cli_logs_to_a_real_mlflow_store(tmp_path, converted, capsys, annotations):
    from mlflow.tracking import MlflowClient

    from linrep.imagenetx_cli import cli_main

    fab, shards = converted
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert cli_main([str(shards), "-m", "pixels:16,size=16,label=px", "--out", str(tmp_path / "out"),
                     "--seeds", "2", "--workers", "0", "--device", "cpu", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "| target | px |" in out and f"px {annotated_good_val(fab, annotations)} of 46,110" in out
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("imagenet")
    run = client.search_runs([exp.experiment_id])[0]
    assert "probe/imagenetx/px/class_binary" in run.data.metrics
    assert run.data.params["models"] == "px" and run.info.status == "FINISHED"
    names = {a.path for a in client.list_artifacts(run.info.run_id, "imagenetx")}
    assert names == {"imagenetx/imagenetx_probe.csv", "imagenetx/imagenetx_probe.md", "imagenetx/imagenetx_probe.png"}


def test_checkpoint_probe_during_training(converted, annotations):
    """The probe actor's ImageNet figures: val accuracy at the run's granularity + ImageNet-X."""
    from probes.imagenetx import checkpoint_probe
    from trainer.config import load_config
    from trainer.models import InputSpec, build_classifier

    fab, shards = converted
    cfg = load_config("synthetic-supervised", ["data.dataset=imagenet", "data.labels=imagenet",
                                               f"data.root={shards}", "data.image_size=32",
                                               "data.granularity=binary", "model.encoder=resnet18"])
    torch.manual_seed(0)
    model = build_classifier(cfg, InputSpec(channels=3, size=32), 2).eval()
    state: dict = {}
    figures = checkpoint_probe(model, cfg, state)
    assert 0.0 <= figures["val/acc"] <= 1.0 and "val/acc_top5" not in figures  # 2 classes
    assert figures["probe/imagenetx/found_images"] == annotated_good_val(fab, annotations)
    assert 0.0 <= figures["probe/imagenetx/class_binary"] <= 1.0
    assert "probe/imagenetx/significant_targets" in figures
    assert set(state["artifacts"]) == {"imagenetx.md", "imagenetx.csv"}
    assert "class_binary" in state["artifacts"]["imagenetx.md"]
