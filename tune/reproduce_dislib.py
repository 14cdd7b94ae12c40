"""`linrep reproduce dislib`: the paper's DisLib table (section 4.2) as one sweep.

The definitions are in docs/science.md (the DisLib table). For each dataset whose shards exist under
--root (one folder per dataset, named as the presets: <root>/dsprites, shapes3d, mpi3d, cars3d,
smallnorb, each with the manifest.json of `linrep data ...`; dSprites is rendered there when it is
missing), two classifiers of its categorical factor:

  MLP   preset dislib-<dataset>-mlp (dSprites) / dislib-<dataset> (the others)
  CNN   preset dislib-<dataset>-cnn when there is one, else the MLP preset with model.encoder=resnet18
        (timm, in_chans from the manifest: 1 for dSprites and smallNORB, 3 for the others)

each trained with the paper's recipe and stop rule (the preset's: Adam 1e-3, batch 4096, up to ~100
epochs, stop once val/acc > 0.999, run.stop_at) for 3 seeds by default (--seeds); steps = the
preset's x --budget. As in the public code, validation accuracy (and with it the stop rule) is checked
once per epoch: a trial checkpoints and probes every ceil(training split / batch) steps (144 on
dSprites), not at the preset's finer interval, so each whole-split probe stands for an epoch.
--models mlp (or cnn) runs one column of the table: ResNet-18 to the stop rule needs GPUs, the MLP
rows run on a CPU machine. Every factor is decoded (categorical ones included, as the public code does) by
a linear decoder fitted on the whole training split (probe.max_train_samples=0: streamed normal
equations, probes.factors) and scored on the test split (probe.score_split=test, all of it); the
raw-pixel baseline goes through the same fit on the same splits.

--quick is the CI preset: dSprites only, a seeded 3,000-image subset rendered into
<root>/dsprites-quick (never mixed with a full set), 32x32 inputs, a small MLP, batch 128, a few
dozen steps, one seed. --plan prints every trial and runs (and renders) nothing. --set KEY=VALUE
(repeatable) goes into every trial, e.g. `--set run.use_gpu=true --set run.workers=2` on GPUs (the
presets train on CPU unless told); a sweep with settings is named with their hash.

It runs as an ordinary sweep (tune.sweep.run_sweep: parent + child MLflow runs in experiment
'dislib', resume by rerunning the same command) and ends with the paper's table, rows dataset x
factor, columns Pearson r of the MLP, the CNN (mean ± std over seeds) and the pixels:
summary/dislib_table.md and .csv in the sweep folder, and plots/dislib_table.png (one panel per
dataset, model vs pixels per factor), all on the parent MLflow run.
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.config import ConfigError, list_presets
from trainer.errors import UserError
from tune.spec import SweepPlan, Trial, sweep_root, trial_config
from tune.summary import Summary, markdown_table, mean_std, pm, trial_table

DATASETS = ("dsprites", "shapes3d", "mpi3d", "cars3d", "smallnorb")   # the paper's table order
DATASET_TITLES = {"dsprites": "dSprites", "shapes3d": "3dshapes", "mpi3d": "MPI3D", "cars3d": "Cars3D",
                  "smallnorb": "smallNORB"}
MODELS = ("mlp", "cnn")
MODEL_TITLES = {"mlp": "MLP", "cnn": "CNN (ResNet-18)"}
CNN_ENCODER = "resnet18"
EXPERIMENT = "dislib"
DEFAULT_ROOT = "./data"
DEFAULT_SEEDS = 3
QUICK_SEEDS = 1
QUICK_FOLDER = "dsprites-quick"
QUICK_IMAGES = 3000
QUICK_STEPS = 40
QUICK_OVERRIDES = {"data.image_size": 32, "optim.batch_size": 128, "data.shuffle_buffer": 200,
                   "run.log_every": 10, "optim.engine": "ddp", "optim.zero_stage": 0}
QUICK_MLP_HIDDEN = [64, 64, 64]
# every trial: decoders on the whole training split, scored on the whole test split
PROBE_OVERRIDES = {"probe.max_train_samples": 0, "probe.max_eval_samples": 0, "probe.score_split": "test"}
# the stop rule acts on the epoch that reached it: training waits for each epoch's probe, as the
# public code validates after each epoch (without it, measured on 2 cores with two trials at a time:
# the whole-split probes fell 3.5 epochs behind training within 15 min, each epoch between them
# queued for a probe of its own)
STOP_RULE = {"run.stop_wait": True}
METRIC = "val/acc"
PIXELS = "pixels"


@dataclass(frozen=True)
class Dataset:
    """A dataset of the table: its shards folder, and whether it still has to be rendered."""

    name: str
    root: Path
    generate: bool = False        # dSprites with no manifest yet: rendered before the sweep starts
    limit: int | None = None      # --quick: a seeded subset of the grid


def mlp_preset(dataset: str) -> str:
    presets = set(list_presets())
    return next(p for p in (f"dislib-{dataset}-mlp", f"dislib-{dataset}") if p in presets)


def model_base(dataset: str, model: str) -> tuple[str, dict[str, Any]]:
    """(preset, overrides) of one model on one dataset."""
    if model == "mlp":
        return mlp_preset(dataset), {}
    if f"dislib-{dataset}-cnn" in set(list_presets()):
        return f"dislib-{dataset}-cnn", {}
    return mlp_preset(dataset), {"model.encoder": CNN_ENCODER}


def check_root(root: Path) -> None:
    """--root must be a folder, or one that can be created (dSprites is rendered into it)."""
    if root.exists():
        if not root.is_dir():
            raise UserError(f"--root {root}: exists and is not a folder")
        return
    parent = next(p for p in root.parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--root {root}: does not exist and cannot be created ({parent} is not a writable folder)")


def find_datasets(root: Path, quick: bool) -> list[Dataset]:
    """The datasets under root in table order; dSprites always (rendered when missing)."""
    from trainer.data.shards import MANIFEST_NAME

    check_root(root)
    if quick:
        folder = root / QUICK_FOLDER
        return [Dataset("dsprites", folder, not (folder / MANIFEST_NAME).is_file(), QUICK_IMAGES)]
    found = []
    for name in DATASETS:
        folder = root / name
        has = (folder / MANIFEST_NAME).is_file()
        if has or name == "dsprites":
            found.append(Dataset(name, folder, not has))
    return found


def check_manifest(ds: Dataset) -> None:
    """A folder named like a dataset must hold that dataset."""
    from trainer.data.shards import load_manifest

    if ds.generate:
        return
    manifest = load_manifest(ds.root)
    if manifest.dataset != ds.name:
        raise UserError(f"{ds.root}: its manifest.json is dataset '{manifest.dataset}', not '{ds.name}' "
                        f"(--root holds one folder per dataset, named {', '.join(DATASETS)})")


def parse_models(text: str | None) -> tuple[str, ...]:
    """`--models mlp,cnn` -> the table's columns to run, in table order (default: both)."""
    if text is None:
        return MODELS
    asked = [m.strip().lower() for m in text.split(",") if m.strip()]
    wrong = [m for m in asked if m not in MODELS]
    if not asked or wrong:
        raise UserError(f"--models {text}: {'unknown ' + ', '.join(wrong) if wrong else 'empty'} "
                        f"(one or more of {', '.join(MODELS)}, comma-separated)")
    return tuple(m for m in MODELS if m in asked)


def train_samples(ds: Dataset) -> int:
    """The training split's size: from the manifest, or (dSprites still to render) from the split rule."""
    from trainer.data.shards import load_manifest

    if not ds.generate:
        return int(load_manifest(ds.root).splits["train"]["num_samples"])
    from trainer.data.convert.dsprites import NUM_IMAGES
    from trainer.data.convert.shards import split_indices

    return len(split_indices(min(ds.limit or NUM_IMAGES, NUM_IMAGES), 0)["train"])


def trial_overrides(ds: Dataset, model: str, base_steps: int, budget: float, quick: bool) -> dict[str, Any]:
    steps = QUICK_STEPS if quick else base_steps
    steps = max(10, int(round(steps * budget)))
    overrides: dict[str, Any] = {"data.root": str(ds.root), "optim.steps": steps, "tracking.experiment": EXPERIMENT,
                                 **PROBE_OVERRIDES, **STOP_RULE}
    if quick:
        overrides.update(QUICK_OVERRIDES)
        overrides.update({"run.checkpoint_every": steps, "optim.warmup_steps": 0})  # one probe: the final one
        if model == "mlp":
            overrides["model.hidden"] = QUICK_MLP_HIDDEN
    return overrides


RESERVED = {"data.root", "data.dataset", "run.seed", "tracking.experiment"}  # what the table is built from


def parse_settings(items: list[str] | None) -> dict[str, Any]:
    """`--set KEY=VALUE` items (YAML values, as `linrep train`'s overrides) -> {key: value}."""
    from trainer.config import parse_override

    out: dict[str, Any] = {}
    for item in items or []:
        try:
            path, value = parse_override(item)
        except ConfigError as err:
            raise UserError(f"--set {item}: {err}") from None
        key = ".".join(path)
        if key in RESERVED:
            raise UserError(f"--set {item}: {key} is set by reproduce dislib itself (use --root / --seeds)")
        out[key] = value
    return out


def build_dislib_plan(root: str | Path | None = None, *, quick: bool = False, seeds: int | None = None,
                      budget: float = 1.0, storage: str | None = None,
                      settings: dict[str, Any] | None = None,
                      models: tuple[str, ...] = MODELS) -> tuple[SweepPlan, list[Dataset]]:
    """The reproduce sweep: every dataset x model x seed as a trial, validated before Ray starts;
    and the datasets (those to render first marked). `settings` (--set) go into every trial last,
    e.g. run.use_gpu=true run.workers=2 for a GPU cluster."""
    settings = dict(settings or {})
    if not budget > 0:
        raise UserError(f"--budget {budget}: must be > 0 (a multiple of the presets' step budgets)")
    seeds = seeds if seeds is not None else (QUICK_SEEDS if quick else DEFAULT_SEEDS)
    if seeds < 1:
        raise UserError(f"--seeds {seeds}: must be >= 1")
    root = Path(root or DEFAULT_ROOT).expanduser().absolute()
    datasets = find_datasets(root, quick)
    for ds in datasets:
        check_manifest(ds)
    name = dislib_name(quick, budget, seeds, settings, models)
    trials = []
    for ds in datasets:
        n_train = None if quick or "run.checkpoint_every" in settings else train_samples(ds)
        for model in models:
            base, extra = model_base(ds.name, model)
            try:
                preset = trial_config(Trial("probe", base, {"data.root": str(ds.root), **settings}, {}, 0, ""))
            except ConfigError as err:
                raise UserError(f"reproduce dislib: preset {base}: {err}") from None
            overrides = {**extra, **trial_overrides(ds, model, preset.optim.steps, budget, quick), **settings}
            if n_train is not None:  # the stop rule once per epoch
                overrides["run.checkpoint_every"] = max(1, math.ceil(n_train / preset.optim.batch_size))
            for seed in range(seeds):
                trials.append(Trial(key=f"{name}-{ds.name}-{model}-s{seed}", base=base,
                                    overrides={**overrides, "run.seed": seed},
                                    values={"dataset": ds.name, "model": model}, seed=seed,
                                    group=f"{DATASET_TITLES[ds.name]} {MODEL_TITLES[model]}"))
    cfg = None
    for t in trials:
        try:
            cfg = trial_config(t)
        except ConfigError as err:
            raise UserError(f"reproduce dislib: {t.group}: {err}") from None
    run = cfg.run
    spec_text = (f"# linrep reproduce dislib --root {root}{' --quick' if quick else ''} --budget {budget:g} "
                 f"--seeds {seeds}\n" + "\n".join(f"{t.key}: {t.base} {t.overrides}" for t in trials) + "\n")
    plan = SweepPlan(name=name, trials=trials, swept=["dataset", "model"], metric=METRIC, mode="max",
                     resources={"workers": run.workers, "cpus_per_worker": run.cpus_per_worker,
                                "use_gpu": run.use_gpu},
                     max_concurrent=None, experiment=EXPERIMENT,
                     storage=str(sweep_root(storage, None, None, run.storage)), spec_text=spec_text, kind="reproduce")
    return plan, datasets


def dislib_name(quick: bool, budget: float, seeds: int, settings: dict[str, Any] | None = None,
                models: tuple[str, ...] = MODELS) -> str:
    """Distinct arguments, distinct sweeps (each resumable by rerunning the same command)."""
    name = "reproduce-dislib" + ("-quick" if quick else "")
    if tuple(models) != MODELS:
        name += "-" + "-".join(models)
    if budget != 1.0:
        name += f"-b{budget:g}"
    if seeds != (QUICK_SEEDS if quick else DEFAULT_SEEDS):
        name += f"-s{seeds}"
    if settings:
        import hashlib
        import json

        name += "-" + hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:6]
    return name


PLAN_FIXED = {"optim.steps", "run.seed", "data.root", "tracking.experiment", "run.checkpoint_every", *PROBE_OVERRIDES,
              *STOP_RULE}


def plan_table(plan: SweepPlan, datasets: list[Dataset]) -> str:
    """`--plan`: one line per trial (dataset, model, seed, preset, overrides, steps); runs nothing."""
    every = sorted({t.overrides.get("run.checkpoint_every") for t in plan.trials} - {None})
    lines = [f"### {plan.name}: {len(plan.trials)} trials, {sum(t.overrides['optim.steps'] for t in plan.trials):,} "
             "steps in all (each stops early once val/acc > 0.999"
             + (f", checked every {'/'.join(map(str, every))} steps: once per epoch" if every else "") + ")", ""]
    for ds in datasets:
        state = (f"rendered first: {'a ' + format(ds.limit, ',') + '-image subset' if ds.limit else 'the full grid'}"
                 if ds.generate else "shards found")
        lines.append(f"- {ds.name}: {ds.root} ({state})")
    lines += ["- decoders: fitted on the whole training split (streamed), scored on the whole test split; "
              "raw pixels on the same splits", ""]
    lines += trial_table(plan, ["trial", "dataset", "model", "seed", "preset"],
                         lambda t: [t.key, t.values["dataset"], MODEL_TITLES[t.values["model"]], str(t.seed), t.base],
                         PLAN_FIXED)
    return "\n".join(lines) + "\n"


def render_missing(datasets: list[Dataset], processes: int = 2) -> None:
    """Render dSprites where its manifest is missing (resumable: the shard writer skips done shards)."""
    from trainer.data.convert.dsprites import NUM_IMAGES, generate_dsprites

    for ds in datasets:
        if not ds.generate:
            continue
        n = min(ds.limit or NUM_IMAGES, NUM_IMAGES)
        try:
            ds.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"--root {ds.root.parent}: cannot create {ds.root} ({err.strerror or err})") from None
        print(f"[reproduce dislib] rendering dSprites ({n:,} images) into {ds.root}", file=sys.stderr, flush=True)
        generate_dsprites(ds.root, seed=0, samples_per_shard=1000 if ds.limit else 10000, processes=processes,
                          limit=ds.limit, progress=True)


# ---- the paper's table ---------------------------------------------------------------------------
def manifest_factors(datasets: list[Dataset]) -> dict[str, list[tuple[str, str]]]:
    """{dataset: [(factor, kind)]} in manifest order (every factor: a constant one shows '–')."""
    from trainer.data.shards import load_manifest

    return {ds.name: [(f["name"], f["kind"]) for f in load_manifest(ds.root).factors] for ds in datasets}


@dataclass
class TableRow:
    dataset: str
    factor: str
    kind: str
    cells: dict[str, tuple[float, float, int]]     # column (mlp, cnn, pixels) -> (mean, std, n seeds)


def table_rows(summary: Summary, factors: dict[str, list[tuple[str, str]]]) -> list[TableRow]:
    """Rows dataset x factor; per model the mean ± std over finished seeds of probe/pearson/<factor>;
    pixels: the raw-pixel decoder (the same splits for every trial of a dataset: their mean)."""
    by: dict[tuple[str, str], list[dict[str, float]]] = {}
    for t in summary.trials:
        if t.status == "finished":
            by.setdefault((t.trial.values["dataset"], t.trial.values["model"]), []).append(t.final)
    rows = []
    for ds, names in factors.items():
        for factor, kind in names:
            cells = {}
            for model in MODELS:
                vals = [f[f"probe/pearson/{factor}"] for f in by.get((ds, model), []) if f"probe/pearson/{factor}" in f]
                cells[model] = (*mean_std(vals), len(vals))
            pix = [f[f"probe/pearson_pixels/{factor}"] for m in MODELS for f in by.get((ds, m), [])
                   if f"probe/pearson_pixels/{factor}" in f]
            cells[PIXELS] = (mean_std(pix)[0], math.nan, len(pix))  # no spread: one fit per dataset
            rows.append(TableRow(ds, factor, kind, cells))
    return rows


def table_markdown(summary: Summary, rows: list[TableRow]) -> str:
    head = ["dataset", "factor", "kind", "MLP r", "CNN r", "pixels r"]
    body = [[DATASET_TITLES.get(r.dataset, r.dataset), r.factor, r.kind,
             *(pm(r.cells[c][0], r.cells[c][1], 3) for c in (*MODELS, PIXELS))] for r in rows]
    lines = [f"### {summary.plan.name}: Pearson r of linear decoders (fitted on the whole training split, "
             "scored on the test split), mean ± std over seeds", "", *markdown_table(head, body), "",
             _footnote(summary)]
    return "\n".join(lines) + "\n"


def table_csv(rows: list[TableRow]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["dataset", "factor", "kind", *[f"{c}_{s}" for c in (*MODELS, PIXELS) for s in ("r_mean", "r_std", "n")]])
    for r in rows:
        w.writerow([r.dataset, r.factor, r.kind, *[_num(v) for c in (*MODELS, PIXELS) for v in r.cells[c]]])
    return out.getvalue()


def _num(v: float | int) -> str:
    return "" if isinstance(v, float) and math.isnan(v) else (str(v) if isinstance(v, int) else f"{v:.6f}")


def _footnote(summary: Summary) -> str:
    seeds = sorted({t.trial.seed for t in summary.trials})
    missing = [r["configuration"] for r in summary.rows if not r["n"]]
    ran = {t.trial.values["model"] for t in summary.trials}
    not_run = [MODEL_TITLES[m] for m in MODELS if m not in ran]
    return (f"{len(seeds)} seed{'' if len(seeds) == 1 else 's'} per model; '–': a factor with one value "
            "(nothing to decode) or no finished seed; categorical factors are decoded as numbers, as the "
            "public code does; pixels: the same decoder on the raw pixels (average-pooled to 32x32 beyond "
            "64x64x1)" + (f"; without a finished seed: {', '.join(missing)}" if missing else "")
            + (f"; not run (--models): {', '.join(not_run)}" if not_run else ""))


def dislib_tables(summary: Summary, factors: dict[str, list[tuple[str, str]]]) -> dict[str, str]:
    """extra_tables of the sweep: summary/dislib_table.md and summary/dislib_table.csv."""
    rows = table_rows(summary, factors)
    return {"dislib_table.md": table_markdown(summary, rows), "dislib_table.csv": table_csv(rows)}


FIGURE = "dislib_table.png"


def plot_table(rows: list[TableRow], path: Path) -> bool:
    """One panel per dataset: bars of Pearson r per factor, MLP / CNN (± std over seeds) / pixels."""
    from trainer.files import write_with_atomic

    datasets = list(dict.fromkeys(r.dataset for r in rows))
    if not datasets or not any(not math.isnan(c[0]) for r in rows for c in r.cells.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # columns with no value anywhere (a model left out by --models) get no bars and no legend entry
    columns = [c for c in (*MODELS, PIXELS) if any(not math.isnan(r.cells[c][0]) for r in rows)]
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets) + 0.8, 3.8), squeeze=False)
    width = 0.8 / len(columns)
    for ax, ds in zip(axes[0], datasets):
        mine = [r for r in rows if r.dataset == ds]
        xs = range(len(mine))
        for i, col in enumerate(columns):
            means = [0.0 if math.isnan(r.cells[col][0]) else r.cells[col][0] for r in mine]
            stds = [0.0 if math.isnan(r.cells[col][1]) else r.cells[col][1] for r in mine]
            ax.bar([x + (i - (len(columns) - 1) / 2) * width for x in xs], means, width, yerr=stds, capsize=2,
                   label={"mlp": "MLP", "cnn": "CNN", PIXELS: "pixels"}[col],
                   color={"mlp": "C0", "cnn": "C1", PIXELS: "C2"}[col])   # the same colour in every figure
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r.factor for r in mine], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(min(0.0, *(r.cells[c][0] for r in mine for c in r.cells if not math.isnan(r.cells[c][0]))), 1.0)
        ax.set_title(DATASET_TITLES.get(ds, ds))
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("Pearson r (test split)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    write_with_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return True


def publish_figure(outcome, factors: dict[str, list[tuple[str, str]]]) -> Path | None:
    """plots/dislib_table.png in the sweep folder and on the parent MLflow run."""
    from trainer import tracking

    if outcome.summary is None:
        return None
    rows = table_rows(outcome.summary, factors)
    with outcome.plan.sweep_dir.staged_writes() as staging:
        path = staging / "plots" / FIGURE
        if not plot_table(rows, path):
            return None
        tracking.log_artifact(outcome.tracking_uri, outcome.parent_run_id, path, "plots")
    return path


# ---- the command line (wired into `linrep reproduce` by linrep/cli.py) ---------------------------
def reproduce_dislib_cli(args) -> int:
    """`linrep reproduce dislib [--root DIR] [--quick] [--seeds K] [--budget B] [--models M] [--set K=V ...]
    [--plan] [--address A] [--storage S]`."""
    plan, datasets = build_dislib_plan(getattr(args, "root", None), quick=bool(args.quick), seeds=args.seeds,
                                       budget=float(args.budget), storage=getattr(args, "storage", None),
                                       settings=parse_settings(getattr(args, "set", None)),
                                       models=parse_models(getattr(args, "models", None)))
    if getattr(args, "plan", False):
        print(plan_table(plan, datasets), end="", file=sys.stdout)
        return 0
    render_missing(datasets)
    factors = manifest_factors(datasets)
    from tune.sweep import finish_message, run_sweep

    outcome = run_sweep(plan, address=getattr(args, "address", None),
                        extra_tables=lambda summary: dislib_tables(summary, factors))
    figure = publish_figure(outcome, factors)
    print(f"\nreproduce dislib: {outcome.counts.get('finished', 0)}/{len(plan.trials)} trials finished; "
          f"MLflow parent run {outcome.parent_run_id} (experiment '{plan.experiment}'); "
          f"tables in {plan.sweep_dir / 'summary'}" + (f", figure {plan.sweep_dir / 'plots' / FIGURE}" if figure else ""),
          file=sys.stdout)
    return finish_message(outcome)
