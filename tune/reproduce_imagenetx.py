"""`linrep reproduce imagenetx`: the paper's figure 3 (section 4.3) with the public code's protocol.

The settings and where each comes from are in docs/science.md, ImageNet-X. In short, as the
public code (klindtlab/csi, imagenetx/): imagenet_x.load_annotations() with its defaults (top
factor, prototypes filtered), units with mean activation <= 0 dropped, 10 seeds of balanced
70/30 logistic probes, two-sided one-sample t-tests against 0.5, Bonferroni over 17 targets x 5
feature sources, SEM error bars.

Feature sources (the table's columns, the figure's bars):

  trained   resnet50 and vit_base_patch16_224 with ImageNet-1k weights from local files
            (--weights NAME[.TAG]=PATH; skipped, with a line saying so, when not given)
  random    the same two architectures at (seeded) random initialisation
  pixels    a fixed random projection of the 224x224 pixels to 2048 units (as ResNet-50's)
  linrep    any linrep checkpoint (--checkpoint RUN_FOLDER_OR_CHECKPOINT)

Nothing is downloaded: a weights file is read weights-only (safetensors, or torch.load with
weights_only=True) and a missing one ends the command in one line (exit 2). --quick is the CI
preset: timm's tiny test_resnet / test_vit, 64 pixel units of 32x32 images, 3 seeds.

One MLflow run (experiment 'imagenet') is the parent: params (sources, timm names with weight
tags, file hashes, protocol), every metric, the CSV and markdown tables and the figure; each
source also gets a child run with its own metrics.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

from trainer.errors import UserError

PAPER_TARGETS = 17
PAPER_SOURCES = 5  # trained ResNet-50, trained ViT-B/16, both at random init, pixels
# architecture -> default weight tag: ImageNet-1k classifiers in timm's names (docs/science.md).
# resnet50.tv2_in1k is torchvision's IMAGENET1K_V2, the public code's ResNet50_Weights.DEFAULT
# (cross-entropy). The public ViT (torchvision's ViT_B_16_Weights.IMAGENET1K_V1) is not among
# timm's weights; vit_base_patch16_224.augreg_in1k is timm's ViT-B/16 trained on ImageNet-1k only.
ARCHITECTURES = {"resnet50": "tv2_in1k", "vit_base_patch16_224": "augreg_in1k"}
QUICK_ARCHITECTURES = {"test_resnet": "r160_in1k", "test_vit": "r160_in1k"}  # timm's smallest
PIXELS = {"dim": 2048, "size": 224}  # public: nn.Linear(224*224*3, 2048), "same as resnet50"
QUICK_PIXELS = {"dim": 64, "size": 32}
DEFAULT_SEEDS = 10  # public decode.py: num_rep = 10
QUICK_SEEDS = 3
EXPERIMENT = "imagenet"


@dataclass(frozen=True)
class WeightsFile:
    """A local weights file for one architecture: `--weights NAME[.TAG]=PATH`."""

    architecture: str
    tag: str
    path: Path
    sha256: str

    @property
    def timm_name(self) -> str:
        return f"{self.architecture}.{self.tag}"


@dataclass(frozen=True)
class Source:
    """One feature source: a column of the table, a group of bars in the figure."""

    label: str
    group: str  # trained | random | pixels | linrep
    spec: object  # probes.imagenetx.ModelSpec
    params: dict = field(default_factory=dict)  # what the MLflow run records about it


def architectures(quick: bool) -> dict[str, str]:
    return QUICK_ARCHITECTURES if quick else ARCHITECTURES


def parse_weights(items: list[str] | None, quick: bool) -> dict[str, WeightsFile]:
    """`NAME[.TAG]=PATH` per item -> {architecture: WeightsFile}; every file read weights-only now,
    so a missing, unreadable or code-carrying file ends the command before any feature is extracted."""
    from probes.imagenetx.extractors import load_weights_file

    known = architectures(quick)
    out: dict[str, WeightsFile] = {}
    for item in items or []:
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            raise UserError(f"--weights {item}: expected NAME[.TAG]=PATH, e.g. resnet50.tv2_in1k=/weights/resnet50.safetensors")
        arch, _, tag = name.strip().partition(".")
        if arch not in known:
            mode = "with --quick" if quick else "without --quick"
            raise UserError(f"--weights {item}: architecture '{arch}' is not a source {mode} "
                            f"(choose {' or '.join(known)})")
        if arch in out:
            raise UserError(f"--weights {item}: {arch} is given twice")
        tag = tag or known[arch]
        _check_timm_tag(arch, tag, item)
        path = Path(path).expanduser()
        load_weights_file(path)  # missing / not weights-only / not a state dict: one line, exit 2
        out[arch] = WeightsFile(arch, tag, path, _sha256(path))
    return out


def _check_timm_tag(arch: str, tag: str, item: str) -> None:
    import timm

    if f"{arch}.{tag}" not in timm.list_pretrained(f"{arch}.*"):
        raise UserError(f"--weights {item}: timm knows no weights '{arch}.{tag}' "
                        f"(name them exactly, e.g. {arch}.{architectures(arch.startswith('test_'))[arch]})")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_checkpoints(items: list[str] | None) -> list[Path]:
    """Each `--checkpoint` a checkpoint folder, or a run folder (its latest complete checkpoint)."""
    from trainer.checkpoint import is_complete, list_checkpoints

    out = []
    for item in items or []:
        folder = Path(item).expanduser()
        if not folder.is_dir():
            raise UserError(f"--checkpoint {item}: no such folder (give a linrep run folder or one of its checkpoint_* folders)")
        if is_complete(folder):
            out.append(folder)
            continue
        found = list_checkpoints(folder)
        if not found:
            raise UserError(f"--checkpoint {item}: neither a complete checkpoint nor a run folder with one")
        out.append(Path(found[-1]))
    return out


def plan_sources(*, quick: bool, weights: dict[str, WeightsFile], checkpoints: list[Path],
                 seed: int) -> tuple[list[Source], list[str]]:
    """The sources in the figure's order, and one line per source left out (and why)."""
    from probes.imagenetx.extractors import ModelSpec, safe_label

    sources, skipped = [], []
    for arch in architectures(quick):
        w = weights.get(arch)
        if w is None:
            skipped.append(f"trained {arch}: skipped, no weights given (--weights {arch}=PATH, "
                           f"e.g. {arch}.{architectures(quick)[arch]} as .safetensors)")
            continue
        spec = ModelSpec("timm", arch, (("file", str(w.path)), ("label", arch)))
        sources.append(Source(arch, "trained", spec, {"timm_name": w.timm_name, "weights_sha256": w.sha256,
                                                      "weights_file": w.path.name}))
    for arch in architectures(quick):
        label = f"{arch}-random"
        sources.append(Source(label, "random", ModelSpec("timm_random", arch, (("label", label),)),
                              {"timm_name": arch, "init_seed": seed}))
    pixels = QUICK_PIXELS if quick else PIXELS
    label = f"pixels-{pixels['dim']}"
    sources.append(Source(label, "pixels", ModelSpec("pixels", str(pixels["dim"]), (
        ("size", str(pixels["size"])), ("seed", str(seed)), ("label", label))),
        {"dim": pixels["dim"], "image_size": pixels["size"], "projection_seed": seed}))
    for folder in checkpoints:
        label = safe_label(f"linrep-{folder.parent.name}-{folder.name}")
        sources.append(Source(label, "linrep", ModelSpec("checkpoint", str(folder), (("label", label),)),
                              {"checkpoint": str(folder)}))
    return sources, skipped


def bonferroni_count(sources: int) -> int:
    """The paper's 17 targets x 5 sources; more when linrep checkpoints join (17 x sources)."""
    return PAPER_TARGETS * max(PAPER_SOURCES, sources)


def footnote(sources: list[Source], skipped: list[str], tested: int, quick: bool) -> str:
    """Which Bonferroni count was used and why, what was left out, and what quick mode is."""
    n = len(sources)
    tests = bonferroni_count(n)
    if n == PAPER_SOURCES:
        why = f"{PAPER_TARGETS} targets x {PAPER_SOURCES} sources = {tests} tests, as in the paper"
    elif n < PAPER_SOURCES:
        why = (f"{tests} tests = {PAPER_TARGETS} targets x {PAPER_SOURCES} sources, the paper's count, although "
               f"only {n} sources ran: a star means what it means in the paper's figure 3 "
               f"(stricter than the {PAPER_TARGETS * n} tests of this run alone)")
    else:
        why = (f"{PAPER_TARGETS} targets x {n} sources = {tests} tests: the paper's {PAPER_SOURCES} sources "
               f"plus {n - PAPER_SOURCES} linrep checkpoint(s)")
    lines = [f"Bonferroni: {why}."]
    if tested < PAPER_TARGETS * n:
        lines.append(f"{PAPER_TARGETS * n - tested} (target, source) pairs could not be tested (n/a: fewer "
                     "than 2 images in a class; or exactly 0.5 on every seed); they still count in the correction.")
    lines += [f"Left out: {line}." for line in skipped]
    if quick:
        lines.append("--quick: timm's tiny test_resnet/test_vit and 32x32 pixels, 3 seeds: a smoke test, "
                     "not the paper's figure.")
    return "\n".join(f"- {line}" for line in lines)


@dataclass
class ReproduceResult:
    probe: object  # probes.imagenetx.ImagenetXResult
    sources: list[Source]
    skipped: list[str]
    tests: int
    footnote: str


def reproduce_imagenetx(shards: Path, *, quick: bool, weights: dict[str, WeightsFile], checkpoints: list[Path],
                        seeds: int, seed: int, out_dir: Path, device: str, batch_size: int,
                        workers: int) -> ReproduceResult:
    """Every source's features -> the public protocol's probes -> tables, figure (SEM), footnote."""
    from probes.imagenetx import run_imagenetx_probe

    sources, skipped = plan_sources(quick=quick, weights=weights, checkpoints=checkpoints, seed=seed)
    for line in skipped:
        print(f"[reproduce imagenetx] {line}", file=sys.stderr, flush=True)
    tests = bonferroni_count(len(sources))
    probe = run_imagenetx_probe(shards, [s.spec for s in sources], out_dir=out_dir, batch_size=batch_size,
                                device=device, seeds=seeds, seed=seed, loader_workers=workers, tests=tests,
                                bonferroni=f"{PAPER_TARGETS} targets x {max(PAPER_SOURCES, len(sources))} sources; "
                                           "see the notes below the table",
                                stem="imagenetx_figure3", title="ImageNet-X factors (paper figure 3)")
    tested = int(probe.table["p_value"].notna().sum())
    note = footnote(sources, skipped, tested, quick)
    md = next(p for p in probe.artifacts if p.suffix == ".md")
    from trainer.files import write_text_atomic

    write_text_atomic(md, md.read_text() + "\n" + note + "\n")
    return ReproduceResult(probe, sources, skipped, tests, note)


def log_reproduce_run(uri: str, result: ReproduceResult, params: dict[str, object]) -> str:
    """The parent run (params, every metric, tables and figure) and one child run per source."""
    from probes.imagenetx import METRIC_PREFIX
    from trainer import tracking

    exp_id = tracking.ensure_experiment(uri, EXPERIMENT)
    name = "reproduce-imagenetx" + ("-quick" if params.get("quick") else "")
    tags = {"linrep.kind": "reproduce-imagenetx", "linrep.git_commit": tracking.git_commit() or ""}
    parent = tracking.create_run(uri, exp_id, name, tags=tags)
    source_params = {f"source.{s.label}.{k}": v for s in result.sources for k, v in {"group": s.group, **s.params}.items()}
    tracking.log_params(uri, parent, {**params, "sources": ",".join(s.label for s in result.sources),
                                      "bonferroni_tests": result.tests, **source_params})
    table = result.probe.table
    significant = table["significant"] & (table["acc_mean"] > 0.5)
    metrics = {**result.probe.metrics, **{f"{METRIC_PREFIX}/{model}/significant_above_chance": float(n)
                                          for model, n in significant.groupby(table["model"]).sum().items()}}
    tracking.log_metrics(uri, parent, metrics, step=0)
    for path in result.probe.artifacts:
        tracking.log_artifact(uri, parent, path, "reproduce_imagenetx")
    for s in result.sources:
        child = tracking.create_run(uri, exp_id, f"{name}-{s.label}", tags=tags, parent_run_id=parent)
        tracking.log_params(uri, child, {"source": s.label, "group": s.group, **s.params})
        prefix = f"{METRIC_PREFIX}/{s.label}/"
        tracking.log_metrics(uri, child, {f"{METRIC_PREFIX}/{k[len(prefix):]}": v for k, v in metrics.items()
                                          if k.startswith(prefix)}, step=0)
        tracking.set_status(uri, child, "FINISHED")
    tracking.set_status(uri, parent, "FINISHED")
    return parent


# ---- the command line (wired into `linrep reproduce` by linrep/cli.py) ---------------------------
def add_imagenetx_arguments(parser) -> None:
    """The `linrep reproduce imagenetx` options (--quick and --seeds are shared with `synthetic`)."""
    g = parser.add_argument_group("imagenetx (linrep reproduce imagenetx)")
    g.add_argument("--shards", default=None, help="folder with the ImageNet val shards + manifest.json (linrep data imagenet)")
    g.add_argument("--weights", action="append", metavar="NAME[.TAG]=PATH",
                   help="repeatable: local ImageNet-1k weights (.safetensors preferred), e.g. "
                        "resnet50.tv2_in1k=/w/resnet50.safetensors, vit_base_patch16_224.augreg_in1k=/w/vit.safetensors")
    g.add_argument("--checkpoint", action="append", metavar="RUN_OR_FOLDER",
                   help="repeatable: a linrep run folder (its latest checkpoint) or a checkpoint folder")
    g.add_argument("--out", default=None, help="folder for the tables and figure (default results/reproduce-imagenetx[-quick])")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--workers", type=int, default=2, help="image-decoding processes")
    g.add_argument("--seed", type=int, default=0, help="base seed of splits, random inits and the pixel projection")
    g.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlruns)")
    g.add_argument("--no-log", action="store_true", help="do not log to MLflow")


def reproduce_imagenetx_cli(args) -> int:
    """`linrep reproduce imagenetx --shards DIR [--weights ...] [--checkpoint ...] [--seeds K] [--quick]`."""
    quick = bool(args.quick)
    if getattr(args, "budget", 1.0) != 1.0 or getattr(args, "address", None):
        raise UserError("reproduce imagenetx: --budget and --address belong to `reproduce synthetic`")
    if not args.shards:
        raise UserError("reproduce imagenetx: --shards FOLDER is required (the val shards of `linrep data imagenet`)")
    seeds = args.seeds if args.seeds is not None else (QUICK_SEEDS if quick else DEFAULT_SEEDS)
    if seeds < 2:
        raise UserError(f"--seeds {seeds}: the t-test needs >= 2 seeds")
    weights = parse_weights(args.weights, quick)
    checkpoints = resolve_checkpoints(args.checkpoint)
    out_dir = Path(args.out or ("results/reproduce-imagenetx" + ("-quick" if quick else "")))
    device = args.device or _default_device()
    result = reproduce_imagenetx(Path(args.shards), quick=quick, weights=weights, checkpoints=checkpoints,
                                 seeds=seeds, seed=args.seed, out_dir=out_dir, device=device,
                                 batch_size=args.batch_size, workers=args.workers)
    print(next(p for p in result.probe.artifacts if p.suffix == ".md").read_text())
    print(f"tables and figure in {out_dir}")
    if not args.no_log:
        from trainer.config import TrackingConfig
        from trainer.tracking import resolve_uri

        uri = resolve_uri(TrackingConfig(uri=args.tracking_uri))
        run_id = log_reproduce_run(uri, result, {
            "quick": quick, "seeds": seeds, "seed": args.seed, "shards": args.shards,
            "annotations": "imagenet_x.load_annotations() defaults (top factor, prototypes filtered)",
            "class_split": "mean", "t_test": "two-sided, one-sample vs 0.5", "error_bars": "SEM (ddof=0)",
            "drop_units": "mean activation <= 0"})
        print(f"logged to MLflow run {run_id} (experiment '{EXPERIMENT}')")
    return 0


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
