"""`linrep reproduce dislib`: the plan (datasets found under --root, models, seeds, overrides, --plan),
the streamed full-split decoders against the in-memory ones, the paper-style table from fabricated
summaries, and (slow) `reproduce dislib --quick` end to end through Ray Tune and MLflow."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import run_linrep
from trainer.data.shards import Manifest, ShardInfo, make_factor
from trainer.data.convert.shards import write_manifest
from trainer.errors import UserError
from tune.reproduce_dislib import (DEFAULT_SEEDS, QUICK_FOLDER, QUICK_STEPS, Dataset, build_dislib_plan,
                                   dislib_name, dislib_tables, parse_models, parse_settings, plot_table, table_rows)
from tune.spec import trial_config
from tune.summary import TrialRow, summarise

DSPRITES_FACTORS = ["color", "shape", "scale", "orientation", "posX", "posY"]


def fake_manifest(folder: Path, dataset: str, channels: int, factors: list[str]) -> None:
    """A manifest.json naming `dataset`, and its (empty) shard: the plan opens no shard."""
    info = [ShardInfo("train-000000.tar", 8, "0" * 64)]
    write_manifest(folder, Manifest(
        dataset=dataset, channels=channels, image_size=64, image_format="png",
        factors=[make_factor(f, "categorical" if i == 0 else "continuous", [0.0, 1.0]) for i, f in enumerate(factors)],
        default_factor=factors[0], num_samples=8, seed=0,
        splits={s: {"num_samples": 8, "shards": info} for s in ("train", "val", "test")}))
    (folder / info[0].name).write_bytes(b"")


@pytest.fixture
def dislib_root(tmp_path) -> Path:
    """dSprites, shapes3d and smallnorb with manifests; mpi3d without one; an unrelated folder."""
    root = tmp_path / "data"
    fake_manifest(root / "dsprites", "dsprites", 1, DSPRITES_FACTORS)
    fake_manifest(root / "shapes3d", "shapes3d", 3, ["shape", "floor_hue", "scale"])
    fake_manifest(root / "smallnorb", "smallnorb", 1, ["category", "elevation"])
    (root / "mpi3d").mkdir()
    (root / "notes").mkdir()
    return root


def test_plan_finds_datasets_models_and_seeds(tmp_path, dislib_root):
    plan, datasets = build_dislib_plan(dislib_root, storage=str(tmp_path / "sw"))
    assert plan.name == "reproduce-dislib" and plan.kind == "reproduce" and plan.experiment == "dislib"
    assert [d.name for d in datasets] == ["dsprites", "shapes3d", "smallnorb"]   # table order; mpi3d has no manifest
    assert not any(d.generate for d in datasets)
    assert len(plan.trials) == 3 * 2 * DEFAULT_SEEDS and len(plan.groups()) == 6
    assert {t.seed for t in plan.trials} == {0, 1, 2}
    bases = {(t.values["dataset"], t.values["model"]): t.base for t in plan.trials}
    assert bases == {("dsprites", "mlp"): "dislib-dsprites-mlp", ("dsprites", "cnn"): "dislib-dsprites-cnn",
                     ("shapes3d", "mlp"): "dislib-shapes3d", ("shapes3d", "cnn"): "dislib-shapes3d",
                     ("smallnorb", "mlp"): "dislib-smallnorb", ("smallnorb", "cnn"): "dislib-smallnorb"}
    for t in plan.trials:  # every trial: whole training split, scored on test, in one experiment
        o = t.overrides
        assert (o["probe.max_train_samples"], o["probe.max_eval_samples"], o["probe.score_split"]) == (0, 0, "test")
        assert o["data.root"] == str(dislib_root.absolute() / t.values["dataset"]) and o["run.seed"] == t.seed
        assert o["run.checkpoint_every"] == 1        # once per epoch: 8 training samples, one batch
        cfg = trial_config(t)
        assert cfg.experiment_name == "dislib" and cfg.run.stop_at == {"val/acc": 0.999}   # the paper's stop rule
        assert cfg.model.encoder == ("dislib_mlp" if t.values["model"] == "mlp" else "resnet18")
        assert cfg.optim.batch_size == 4096 and cfg.optim.lr == 1e-3
    steps = {t.key: t.overrides["optim.steps"] for t in plan.trials}
    assert steps["reproduce-dislib-dsprites-mlp-s0"] == 14400 and steps["reproduce-dislib-smallnorb-cnn-s2"] == 949
    assert trial_config(plan.trial("reproduce-dislib-shapes3d-cnn-s1")).data.dataset == "shapes3d"
    two, _ = build_dislib_plan(dislib_root, budget=2, seeds=1, storage=str(tmp_path / "sw"))
    assert two.name == "reproduce-dislib-b2-s1" and len(two.trials) == 6
    assert two.trial("reproduce-dislib-b2-s1-smallnorb-mlp-s0").overrides["optim.steps"] == 2 * 949
    assert dislib_name(True, 1.0, 1) == "reproduce-dislib-quick"
    gpu, _ = build_dislib_plan(dislib_root, settings=parse_settings(["run.use_gpu=true", "run.workers=2"]),
                               storage=str(tmp_path / "sw"))
    assert gpu.name.startswith("reproduce-dislib-") and gpu.name != plan.name
    assert gpu.resources == {"workers": 2, "cpus_per_worker": 1.0, "use_gpu": True}
    assert all(t.overrides["run.use_gpu"] is True and trial_config(t).run.workers == 2 for t in gpu.trials)
    with pytest.raises(UserError, match="run.seed is set by reproduce dislib"):
        parse_settings(["run.seed=3"])
    with pytest.raises(UserError, match="--set optim"):
        parse_settings(["optim"])


def test_quick_plan_is_one_small_dsprites_subset(tmp_path, dislib_root):
    plan, datasets = build_dislib_plan(dislib_root, quick=True, storage=str(tmp_path / "sw"))
    assert plan.name == "reproduce-dislib-quick" and len(plan.trials) == 2
    assert datasets == [Dataset("dsprites", dislib_root.absolute() / QUICK_FOLDER, True, datasets[0].limit)]
    assert 0 < datasets[0].limit <= 5000                       # never the full set found beside it
    for t in plan.trials:
        cfg = trial_config(t)
        assert cfg.optim.steps == QUICK_STEPS and cfg.data.image_size == 32 and cfg.probe.max_train_samples == 0
    assert trial_config(plan.trial("reproduce-dislib-quick-dsprites-cnn-s0")).model.encoder == "resnet18"


def test_missing_dsprites_is_rendered_and_bad_input_is_one_line(tmp_path):
    plan, datasets = build_dislib_plan(tmp_path / "new" / "root", storage=str(tmp_path / "sw"))
    assert [(d.name, d.generate, d.limit) for d in datasets] == [("dsprites", True, None)]
    assert len(plan.trials) == 6 and not (tmp_path / "new").exists()   # planning renders nothing
    # the stop rule is checked once per epoch, as the public code does: 589,824 training images / 4096
    assert {trial_config(t).run.checkpoint_every for t in plan.trials} == {144}
    half, _ = build_dislib_plan(tmp_path / "new" / "root", settings={"optim.batch_size": 2048})
    assert {t.overrides["run.checkpoint_every"] for t in half.trials} == {288}
    fixed, _ = build_dislib_plan(tmp_path / "new" / "root", settings={"run.checkpoint_every": 50})
    assert {trial_config(t).run.checkpoint_every for t in fixed.trials} == {50}   # --set wins
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        build_dislib_plan(tmp_path / "file")
    with pytest.raises(UserError, match="cannot be created"):
        build_dislib_plan(tmp_path / "file" / "root")
    wrong = tmp_path / "wrong"
    fake_manifest(wrong / "shapes3d", "mpi3d", 3, ["object_shape"])
    with pytest.raises(UserError, match="dataset 'mpi3d', not 'shapes3d'"):
        build_dislib_plan(wrong)
    with pytest.raises(UserError, match="--seeds 0"):
        build_dislib_plan(tmp_path, seeds=0)
    with pytest.raises(UserError, match="--budget 0"):
        build_dislib_plan(tmp_path, budget=0)


def test_plan_cli_prints_every_trial_and_runs_nothing(tmp_path, dislib_root):
    out = run_linrep(["reproduce", "dislib", "--plan", "--root", str(dislib_root), "--seeds", "2",
                      "--storage", str(tmp_path / "sw")], cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| reproduce-dislib")]
    assert len(rows) == 12 and "12 trials" in out.stdout
    row = next(r for r in rows if "-shapes3d-cnn-s1 " in r).split(" | ")
    assert row[1:5] == ["shapes3d", "CNN (ResNet-18)", "1", "dislib-shapes3d"]
    assert row[5] == "model.encoder=resnet18" and int(row[6].rstrip(" |")) == 9375
    assert not (tmp_path / "sw").exists() and not (tmp_path / "mlruns").exists()
    bad = run_linrep(["reproduce", "dislib", "--plan", "--root", str(dislib_root / "dsprites" / "manifest.json")],
                     cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "not a folder" in bad.stderr
    misplaced = run_linrep(["reproduce", "synthetic", "--plan", "--root", str(dislib_root)], cwd=tmp_path, timeout=120)
    assert misplaced.returncode == 2 and "only for `linrep reproduce dislib`" in misplaced.stderr


def test_models_runs_one_column_of_the_table(tmp_path, dislib_root):
    assert parse_models(None) == ("mlp", "cnn") and parse_models("cnn, MLP") == ("mlp", "cnn")
    for bad, needle in (("gpu", "unknown gpu"), (",", "empty"), ("mlp,vit", "unknown vit")):
        with pytest.raises(UserError, match=needle):
            parse_models(bad)
    plan, _ = build_dislib_plan(dislib_root, models=parse_models("mlp"), storage=str(tmp_path / "sw"))
    assert plan.name == "reproduce-dislib-mlp" and len(plan.trials) == 3 * DEFAULT_SEEDS   # its own sweep folder
    assert {t.values["model"] for t in plan.trials} == {"mlp"}
    plan.trials = [t for t in plan.trials if t.values["dataset"] == "dsprites"]
    rows = [TrialRow(t, "finished", None, {"probe/pearson/shape": 0.9, "probe/pearson_pixels/shape": 0.3})
            for t in plan.trials]
    table = dislib_tables(summarise(plan, rows), {"dsprites": [("shape", "categorical")]})["dislib_table.md"]
    assert "not run (--models): CNN (ResNet-18)" in table and "| dSprites | shape | categorical | 0.900" in table
    out = run_linrep(["reproduce", "dislib", "--plan", "--models", "mlp", "--root", str(dislib_root),
                      "--storage", str(tmp_path / "sw")], cwd=tmp_path, timeout=120)
    assert out.returncode == 0 and "9 trials" in out.stdout and "CNN" not in out.stdout.split("| trial")[1]
    misplaced = run_linrep(["reproduce", "synthetic", "--plan", "--models", "mlp"], cwd=tmp_path, timeout=120)
    assert misplaced.returncode == 2 and "--models: only for `linrep reproduce dislib`" in misplaced.stderr


@pytest.mark.parametrize("channels", [1, 3])
def test_resnet18_takes_every_datasets_channels(channels):
    """dSprites and smallNORB are grey (1 channel), shapes3d, mpi3d and cars3d RGB (3)."""
    from trainer.config import load_config
    from trainer.models import InputSpec, build_classifier

    cfg = load_config("dislib-dsprites-cnn", ["data.root=unused"])
    model = build_classifier(cfg, InputSpec(channels=channels, size=32), 4).eval()
    with torch.no_grad():
        assert model.features(torch.zeros(2, channels, 32, 32)).shape == (2, 512)


# ---- the streamed fit ---------------------------------------------------------------------------
def regression_case(n: int = 900, p: int = 20, seed: int = 0):
    """Features with a constant (dead) column; factors: two linear in x (one rounded, categorical-like)
    and one constant, in float64."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, p, generator=g, dtype=torch.float64) * 3 + 5)
    x[:, 3] = 1.0
    w = torch.randn(p, 2, generator=g, dtype=torch.float64)
    f = torch.cat([x @ w + 0.5 * torch.randn(n, 2, generator=g, dtype=torch.float64),
                   torch.full((n, 1), 2.0, dtype=torch.float64)], 1)
    f[:, 1] = f[:, 1].round()
    return x, f


def test_streamed_fit_equals_the_in_memory_fit():
    from probes.factors import decode_factors, decode_factors_streamed
    from probes.linear import StreamedLeastSquares, fit_linear

    x, f = regression_case()
    xt, ft, xv, fv = x[:700], f[:700], x[700:], f[700:]
    acc = StreamedLeastSquares()
    for i in range(0, 700, 64):   # uneven batches, the last one short
        acc.add(xt[i:i + 64], ft[i:i + 64, :2])
    assert acc.n == 700
    torch.testing.assert_close(acc.x_std(), xt.std(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(acc.y_mean(), ft[:, :2].mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.y_std(), ft[:, :2].std(0), rtol=1e-10, atol=1e-12)
    live = xt.std(0) > 1e-8
    ref = fit_linear(xt[:, live], ft[:, :2])
    got = acc.fit(acc.x_std() > 1e-8)
    torch.testing.assert_close(got.weight[live], ref.weight, rtol=1e-7, atol=1e-9)
    assert float(got.weight[~live].abs().max()) == 0.0           # the dead column gets no weight
    torch.testing.assert_close(got.predict(xv), ref.predict(xv[:, live]), rtol=1e-8, atol=1e-8)

    names = ["a", "b", "const"]
    train = [{"x": xt[i:i + 100], "factors": ft[i:i + 100]} for i in range(0, 700, 100)]
    scored = [{"x": xv[i:i + 37], "factors": fv[i:i + 37]} for i in range(0, 200, 37)]
    streamed = decode_factors_streamed(train, scored, ["x"], names)["x"]
    in_memory = decode_factors(xt, ft, xv, fv, names)
    assert set(streamed) == set(in_memory) == {"a", "b"}         # a constant factor has nothing to decode
    for name in in_memory:
        assert streamed[name] == pytest.approx(in_memory[name], rel=1e-9, abs=1e-9), name
        assert streamed[name][0] > 0.9


def test_full_split_probe_on_shards_matches_the_in_memory_probe(tmp_path):
    """factor_figures with probe.max_train_samples=0 (streamed, the whole split) gives the figures of
    the in-memory probe given every training sample, on real dSprites shards, scored on test."""
    from probes.factors import factor_figures
    from trainer.config import load_config
    from trainer.data.convert.dsprites import generate_dsprites
    from trainer.models import InputSpec, build_classifier

    manifest = generate_dsprites(tmp_path / "ds", seed=0, samples_per_shard=200, processes=1, limit=600, progress=False)
    n_train = manifest.split_samples("train")
    common = [f"data.root={tmp_path / 'ds'}", "data.image_size=16", "model.hidden=[16]", "data.loader_workers=0",
              "probe.score_split=test", "probe.max_eval_samples=0"]
    torch.manual_seed(0)
    cfg = load_config("dislib-dsprites-mlp", [*common, "probe.max_train_samples=0"])
    model = build_classifier(cfg, InputSpec(channels=1, size=16), 3).eval()
    streamed = factor_figures(model, cfg, {})
    in_memory = factor_figures(model, load_config("dislib-dsprites-mlp", [*common, f"probe.max_train_samples={n_train}"]), {})
    assert set(streamed) == set(in_memory)
    assert {k.split("/")[-1] for k in streamed if k.startswith("probe/pearson/")} == set(DSPRITES_FACTORS) - {"color"}
    for key, value in in_memory.items():
        assert streamed[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    default = factor_figures(model, load_config("dislib-dsprites-mlp", [*common[:4], "probe.max_eval_samples=0"]), {})
    assert default["val/acc"] == streamed["val/acc"]             # accuracy from val whatever split is scored
    assert set(default) == set(streamed) and default["probe/pearson/posX"] != streamed["probe/pearson/posX"]
    with pytest.raises(Exception, match="must be >= 10, or 0"):
        load_config("dislib-dsprites-mlp", [*common, "probe.max_train_samples=5"])


# ---- the table ----------------------------------------------------------------------------------
def fabricated_summary(tmp_path, dislib_root):
    """Two datasets x two models x two seeds, finished with known figures; one seed of the shapes3d CNN
    failed. r = 0.5 + factor index / 20 + seed / 100 (+ 0.2 for the CNN); pixels 0.1 x factor index."""
    plan, _ = build_dislib_plan(dislib_root, seeds=2, storage=str(tmp_path / "sw"))
    plan.trials = [t for t in plan.trials if t.values["dataset"] in ("dsprites", "shapes3d")]
    factors = {"dsprites": [(f, "categorical" if f in ("color", "shape") else "continuous") for f in DSPRITES_FACTORS],
               "shapes3d": [("shape", "categorical"), ("floor_hue", "continuous")]}
    rows = []
    for t in plan.trials:
        final = {"val/acc": 0.99}
        for i, (name, _) in enumerate(factors[t.values["dataset"]]):
            if name == "color":
                continue   # one value: nothing decoded
            final[f"probe/pearson/{name}"] = 0.5 + i / 20 + t.seed / 100 + (0.2 if t.values["model"] == "cnn" else 0)
            final[f"probe/pearson_pixels/{name}"] = 0.1 * i
        status = "failed" if t.key.endswith("shapes3d-cnn-s1") else "finished"
        rows.append(TrialRow(t, status, None, final))
    return summarise(plan, rows), factors


def test_table_rows_are_dataset_by_factor_with_models_and_pixels(tmp_path, dislib_root):
    summary, factors = fabricated_summary(tmp_path, dislib_root)
    tables = dislib_tables(summary, factors)
    md = tables["dislib_table.md"].splitlines()
    assert next(line for line in md if line.startswith("| dataset")) == \
        "| dataset | factor | kind | MLP r | CNN r | pixels r |"
    body = [line.rstrip(" |").split(" | ") for line in md if line.startswith("| ") and not line.startswith("| dataset")]
    assert [(b[0][2:], b[1]) for b in body] == [("dSprites", f) for f in DSPRITES_FACTORS] + [
        ("3dshapes", "shape"), ("3dshapes", "floor_hue")]
    color, scale = body[0], body[2]
    assert color[3:] == ["–", "–", "–"]
    assert scale[2:] == ["continuous", "0.605 ± 0.007", "0.805 ± 0.007", "0.200"]   # pixels: one fit, no spread
    assert body[7][3:] == ["0.555 ± 0.007", "0.750", "0.100"]                          # one CNN seed failed
    assert "2 seeds per model" in tables["dislib_table.md"]
    rows = list(csv.DictReader(io.StringIO(tables["dislib_table.csv"])))
    assert len(rows) == 8 and rows[0]["factor"] == "color" and rows[0]["mlp_n"] == "0"
    posx = next(r for r in rows if r["factor"] == "posX")
    assert math.isclose(float(posx["cnn_r_mean"]), 0.905, abs_tol=1e-6) and posx["cnn_n"] == "2"
    assert math.isclose(float(posx["pixels_r_mean"]), 0.4) and posx["pixels_n"] == "4"
    assert plot_table(table_rows(summary, factors), tmp_path / "fig.png") and (tmp_path / "fig.png").stat().st_size > 1000


@pytest.mark.slow
def test_reproduce_dislib_quick_end_to_end(tmp_path, shared_ray):
    """dSprites rendered (a small subset), MLP and ResNet-18 trained through Ray Tune, the decoders fitted
    on the whole training split and scored on test, the table and its figure on the parent run."""
    import time

    t0 = time.monotonic()
    out = run_linrep(["reproduce", "dislib", "--quick"], cwd=tmp_path, env=shared_ray, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    print(f"reproduce dislib --quick: {time.monotonic() - t0:.0f} s")
    assert "rendering dSprites" in out.stderr and (tmp_path / "data" / QUICK_FOLDER / "manifest.json").is_file()
    assert "| dataset | factor | kind | MLP r | CNN r | pixels r |" in out.stdout
    sweep_dir = tmp_path / "ray_results" / "sweeps" / "reproduce-dislib-quick"
    rows = list(csv.DictReader(io.StringIO((sweep_dir / "summary" / "dislib_table.csv").read_text())))
    assert [r["factor"] for r in rows] == DSPRITES_FACTORS
    for r in rows[1:]:   # every factor but the constant colour: both models and the pixels
        for col in ("mlp", "cnn", "pixels"):
            assert -1 <= float(r[f"{col}_r_mean"]) <= 1, (r["factor"], col)
    assert float(next(r for r in rows if r["factor"] == "posX")["mlp_r_mean"]) > 0.3
    md = (sweep_dir / "summary" / "dislib_table.md").read_text()
    assert all(f"| dSprites | {f} |" in md for f in DSPRITES_FACTORS)
    assert (sweep_dir / "plots" / "dislib_table.png").is_file()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dislib").experiment_id
    parent = client.search_runs([exp], filter_string="tags.`linrep.role` = 'sweep'")[0]
    assert parent.info.run_name == "reproduce-dislib-quick" and parent.info.status == "FINISHED"
    assert {"summary/dislib_table.md", "summary/dislib_table.csv"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    assert "plots/dislib_table.png" in {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    for c in children:
        assert c.data.params["probe.max_train_samples"] == "0" and c.data.params["probe.score_split"] == "test"
        assert "probe/pearson/posX" in c.data.metrics and "probe/pearson_pixels/posX" in c.data.metrics
