"""ImageNet-X probe: do the features of a model linearly encode ImageNet-X's factors of variation?

Protocol (Reizinger et al. 2025, section 4.3, after Idrissi et al. 2022's annotations):

1. features of the annotated ImageNet validation images, joined with the annotations shipped in
   the ``imagenet-x`` package by file name (the shards' ``__key__`` is the file stem);
2. units that never vary over those images (dead ReLU units) are dropped;
3. per target (16 binary factors + the class binarised as class >= 500) and seed: classes
   balanced by subsampling the majority, stratified 70/30 split, features z-scored with the
   training rows' statistics, L2 logistic regression (C=1), test accuracy and ROC-AUC;
4. per target: mean ± std over seeds, one-sample t-test of the accuracies against 0.5
   (alternative "greater"), Bonferroni-corrected over targets x models at alpha 0.05.

All (target, seed) logistic fits run as one batched problem (``probes.logistic``). Feature
extractors are a registry: ``checkpoint`` (a linrep checkpoint), ``timm`` (pretrained),
``timm_random`` (same architecture, random init) and ``pixels`` (a fixed random projection).
Nothing here logs to MLflow: ``run_imagenetx_probe`` returns metrics and artifact paths for the
caller's tracking module.
"""

from __future__ import annotations

import io
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from probes.logistic import (
    balanced_stratified_split,
    decision_function_batched,
    fit_logistic_batched,
    standardize_stats,
    weights_from_index,
)
from trainer.errors import UserError

FACTORS = ("pose", "background", "pattern", "color", "smaller", "shape", "partial_view", "subcategory",
           "texture", "larger", "darker", "object_blocking", "person_blocking", "style", "brighter",
           "multiple_objects")  # the order of imagenet_x.FACTORS
CLASS_TARGET = "class_binary"
TARGETS = FACTORS + (CLASS_TARGET,)
CHANCE = 0.5
ALPHA = 0.05
METRIC_PREFIX = "probe/imagenetx"


# ---- annotations and the join ------------------------------------------------------------------
def load_imagenetx_annotations(which_factor: str = "multi", filter_prototypes: bool = False) -> pd.DataFrame:
    """The ImageNet-X validation annotations: one row per image.

    Columns: ``key`` (file stem, e.g. ILSVRC2012_val_00004487), ``class`` (standard index), the 16
    factors (0/1) and ``class_binary`` (class >= 500). ``which_factor="multi"`` keeps every factor
    an annotator marked (48,868 images, the paper's "~49k"); ``"top"`` only the top factor.
    ``filter_prototypes`` drops the images used as prototypes during annotation."""
    if which_factor not in ("multi", "top"):
        raise UserError(f"ImageNet-X annotations: which_factor='{which_factor}', choose multi or top")
    from imagenet_x import load_annotations  # heavy (pandas, scipy, tqdm): only when probing

    table = load_annotations(which_factor=which_factor, partition="val", filter_prototypes=filter_prototypes)
    out = pd.DataFrame({"key": table["file_name"].map(lambda name: Path(name).stem)})
    out["class"] = table["class"].to_numpy().astype(np.int64)
    for factor in FACTORS:
        out[factor] = table[factor].to_numpy().astype(np.int64)
    out[CLASS_TARGET] = (out["class"] >= 500).astype(np.int64)
    return out.reset_index(drop=True)


def join_features(keys: Sequence[str], features: np.ndarray | Tensor,
                  annotations: pd.DataFrame | None = None) -> tuple[np.ndarray, pd.DataFrame, int]:
    """Keep the feature rows whose key is annotated, in key order.

    keys: the shards' ``__key__`` per feature row (file stems; a ``.JPEG`` suffix is ignored).
    Returns (X [found, p] float32, Y [found rows, targets] with a ``key`` column, found)."""
    annotations = load_imagenetx_annotations() if annotations is None else annotations
    stems = [Path(k).stem if k.lower().endswith((".jpeg", ".jpg")) else k for k in keys]
    if len(stems) != len(features):
        raise UserError(f"ImageNet-X join: {len(stems)} keys but {len(features)} feature rows")
    duplicated = pd.Index(stems)[pd.Index(stems).duplicated()]
    if len(duplicated):
        raise UserError(f"ImageNet-X join: key '{duplicated[0]}' occurs {stems.count(duplicated[0])} times "
                        "(the validation shards must hold each image once)")
    by_key = annotations.set_index("key")
    found_mask = np.fromiter((k in by_key.index for k in stems), dtype=bool, count=len(stems))
    rows = np.flatnonzero(found_mask)
    X = torch.as_tensor(features).detach().cpu().numpy()[rows].astype(np.float32, copy=False)
    Y = by_key.loc[[stems[i] for i in rows], list(TARGETS)].reset_index()
    return X, Y, int(len(rows))


# ---- feature extractors -------------------------------------------------------------------------
@dataclass
class Extractor:
    """Turns a batch of images [B, 3, H, W] (already transformed) into features [B, p]."""

    label: str  # short, MLflow-safe name used in tables and metric keys
    features: Callable[[Tensor], Tensor]
    transform: Callable  # PIL image -> float tensor [3, H, W]
    device: torch.device = torch.device("cpu")


@dataclass(frozen=True)
class ModelSpec:
    """``kind[:arg][,key=value...]``, e.g. ``timm:resnet50``, ``timm_random:vit_base_patch16_224``,
    ``pixels:2048,size=224,seed=0``, ``checkpoint:/runs/x/checkpoint_000010,label=ours``."""

    kind: str
    arg: str = ""
    options: tuple[tuple[str, str], ...] = ()

    def option(self, name: str, default: str | None = None) -> str | None:
        return dict(self.options).get(name, default)

    @property
    def label(self) -> str:
        given = self.option("label")
        if given:
            return safe_label(given)
        if self.kind == "timm":
            return safe_label(self.arg)
        if self.kind == "timm_random":
            return safe_label(f"{self.arg}-random")
        if self.kind == "pixels":
            return safe_label(f"pixels-{self.arg or 2048}")
        return safe_label(f"{self.kind}-{Path(self.arg).name or self.arg}")


def safe_label(text: str) -> str:
    """MLflow metric keys allow letters, digits, _ - . / and spaces: keep a tidy subset."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"


def parse_model_spec(text: str) -> ModelSpec:
    head, *opts = [part.strip() for part in str(text).split(",")]
    kind, _, arg = head.partition(":")
    if kind not in _EXTRACTORS:
        raise UserError(f"model spec '{text}': unknown kind '{kind}' (kinds: {', '.join(sorted(_EXTRACTORS))})")
    options = []
    for opt in opts:
        key, eq, value = opt.partition("=")
        if not eq or not key:
            raise UserError(f"model spec '{text}': option '{opt}' is not key=value")
        options.append((key.strip(), value.strip()))
    return ModelSpec(kind, arg.strip(), tuple(options))


_EXTRACTORS: dict[str, Callable[[ModelSpec, torch.device, int], Extractor]] = {}


def register_extractor(kind: str):
    """Decorator: a factory (spec, device, seed) -> Extractor under this kind."""
    def deco(fn):
        _EXTRACTORS[kind] = fn
        return fn
    return deco


def list_extractors() -> list[str]:
    return sorted(_EXTRACTORS)


def create_extractor(spec: str | ModelSpec, device: str | torch.device = "cpu", seed: int = 0) -> Extractor:
    """The registered extractor for a model spec (see ModelSpec), in eval mode on `device`."""
    spec = parse_model_spec(spec) if isinstance(spec, str) else spec
    return _EXTRACTORS[spec.kind](spec, torch.device(device), seed)


def _frozen(module: torch.nn.Module, device: torch.device) -> Callable[[Tensor], Tensor]:
    module = module.to(device).eval()

    @torch.no_grad()
    def features(images: Tensor) -> Tensor:
        out = module(images.to(device))
        return out.flatten(1) if out.dim() > 2 else out
    return features


def _timm_model(spec: ModelSpec, pretrained: bool, seed: int):
    import timm

    if not spec.arg:
        raise UserError(f"model spec {spec.kind}: name a timm model, e.g. {spec.kind}:resnet50")
    if spec.arg not in timm.list_models() and not timm.is_model(spec.arg):
        raise UserError(f"timm has no model '{spec.arg}' (see timm.list_models())")
    kwargs = {"num_classes": 0}
    weights = spec.option("file")
    if weights:
        if not Path(weights).is_file():
            raise UserError(f"model spec {spec.kind}:{spec.arg}: weights file {weights} does not exist")
        kwargs["pretrained_cfg_overlay"] = {"file": weights}
    torch.manual_seed(seed)  # the random-init baseline is reproducible
    try:
        return timm.create_model(spec.arg, pretrained=pretrained, **kwargs)
    except Exception as err:  # hub/network/file errors come in many types
        if not pretrained:
            raise
        raise UserError(f"timm model '{spec.arg}': pretrained weights cannot be loaded on this machine "
                        f"({err.__class__.__name__}); put them in the Hugging Face cache or pass "
                        f"{spec.kind}:{spec.arg},file=/path/to/weights") from None


def _timm_extractor(spec: ModelSpec, device: torch.device, seed: int, pretrained: bool) -> Extractor:
    import timm.data

    model = _timm_model(spec, pretrained, seed)
    data_cfg = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**data_cfg, is_training=False)
    return Extractor(spec.label, _frozen(model, device), transform, device)


@register_extractor("timm")
def timm_pretrained(spec: ModelSpec, device: torch.device, seed: int) -> Extractor:
    """A timm model with its pretrained weights, classifier removed (pooled features)."""
    return _timm_extractor(spec, device, seed, pretrained=True)


@register_extractor("timm_random")
def timm_random(spec: ModelSpec, device: torch.device, seed: int) -> Extractor:
    """The same timm architecture at (seeded) random initialisation."""
    return _timm_extractor(spec, device, seed, pretrained=False)


@register_extractor("pixels")
def pixel_projection(spec: ModelSpec, device: torch.device, seed: int) -> Extractor:
    """A fixed Gaussian random projection of the flattened, normalised pixels to `dim` features."""
    from trainer.data.imagenet import imagenet_eval_transform

    dim = int(spec.arg or 2048)
    size = int(spec.option("size", "224"))
    seed = int(spec.option("seed", str(seed)))
    generator = torch.Generator().manual_seed(seed)
    inputs = 3 * size * size
    # N(0, 1/inputs): features of unit scale; drawn on the CPU so every device gets the same matrix.
    projection = (torch.randn(inputs, dim, generator=generator) / math.sqrt(inputs)).to(device)

    @torch.no_grad()
    def features(images: Tensor) -> Tensor:
        return images.to(device).flatten(1) @ projection
    return Extractor(spec.label, features, imagenet_eval_transform(size), device)


@register_extractor("checkpoint")
def checkpoint_encoder(spec: ModelSpec, device: torch.device, seed: int) -> Extractor:
    """The encoder f of a linrep checkpoint, fed images as its validation loader feeds them."""
    from trainer.data.imagenet import imagenet_eval_transform

    try:
        from trainer.checkpoint import load_encoder
    except ImportError as err:
        raise UserError(f"checkpoint models need trainer.checkpoint.load_encoder ({err})") from None
    if not spec.arg:
        raise UserError("model spec checkpoint: give the checkpoint folder, e.g. checkpoint:/runs/x/checkpoint_000010")
    encoder, cfg = load_encoder(Path(spec.arg), device)
    return Extractor(spec.label, _frozen(encoder, device), imagenet_eval_transform(cfg.data.image_size), device)


# ---- reading the validation shards ------------------------------------------------------------------
class _ValImages(torch.utils.data.IterableDataset):
    """(key, transformed image) of the annotated images of the val shards, decoded in workers."""

    def __init__(self, urls: list[str], wanted: set[str], transform: Callable):
        self.urls, self.wanted, self.transform = urls, wanted, transform

    def __iter__(self):
        import webdataset as wds
        from PIL import Image

        info = torch.utils.data.get_worker_info()
        urls = self.urls if info is None else self.urls[info.id::info.num_workers]
        # nodesplitter=None: every caller reads all shards (the default refuses under Ray/torchrun).
        for sample in wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None,
                                     empty_check=False):
            key = sample["__key__"]
            if key not in self.wanted:
                continue  # skip before decoding: most of the cost
            data = sample.get("jpg") or sample.get("jpeg") or sample.get("png")
            if data is None:
                raise UserError(f"{sample.get('__url__', 'val shard')}: sample {key} has no jpg/png image")
            try:
                with Image.open(io.BytesIO(data)) as im:
                    image = self.transform(im.convert("RGB"))
            except (OSError, ValueError, SyntaxError) as err:
                raise UserError(f"{sample.get('__url__', 'val shard')}: image {key} cannot be decoded "
                                f"({err.__class__.__name__})") from None
            yield key, image


def val_shard_urls(shards_root: Path) -> list[str]:
    """The val split's shard paths from the manifest (UserError if missing)."""
    from trainer.data.shards import load_manifest, shard_urls

    manifest = load_manifest(Path(shards_root))
    if "val" not in manifest.splits:
        raise UserError(f"{shards_root}: the manifest has no val split (splits: {', '.join(manifest.splits)})")
    return shard_urls(Path(shards_root), manifest, "val")


def extract_features(urls: list[str], extractor: Extractor, wanted: set[str], *, batch_size: int = 64,
                     loader_workers: int = 2, max_images: int | None = None,
                     progress: bool = True) -> tuple[list[str], np.ndarray]:
    """(keys, features [n, p] float32) of the wanted images of the given shards."""
    loader = torch.utils.data.DataLoader(
        _ValImages(urls, wanted, extractor.transform), batch_size=batch_size,
        num_workers=min(loader_workers, len(urls)), collate_fn=_collate)
    keys: list[str] = []
    chunks: list[np.ndarray] = []
    start, next_report = time.monotonic(), 0
    for batch_keys, images in loader:
        if max_images is not None and len(keys) >= max_images:
            break
        chunks.append(extractor.features(images).float().cpu().numpy())
        keys.extend(batch_keys)
        if progress and len(keys) >= next_report:
            print(f"[imagenetx] {extractor.label}: {len(keys):,} images ({time.monotonic() - start:.0f} s)",
                  file=sys.stderr, flush=True)
            next_report += 50 * batch_size
    if not keys:
        raise UserError(f"no annotated ImageNet-X images in the val shards ({len(urls)} shards): "
                        "were they written from the ImageNet validation set with file stems as keys?")
    X = np.concatenate(chunks)
    if max_images is not None:
        keys, X = keys[:max_images], X[:max_images]
    return keys, X


def _collate(batch):
    keys = [k for k, _ in batch]
    return keys, torch.stack([img for _, img in batch])


# ---- the probe --------------------------------------------------------------------------------------
def drop_inactive_units(X: np.ndarray) -> tuple[np.ndarray, int]:
    """Drop units constant over all images (never active for ReLU features; cannot be z-scored)."""
    varies = X.max(0) - X.min(0) > 1e-8 * np.maximum(1.0, np.abs(X).max(0))
    return X[:, varies], int((~varies).sum())


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC-AUC by the rank-sum (Mann-Whitney) formula, ties counted half."""
    from scipy.stats import rankdata

    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def t_test_vs_chance(values: Sequence[float], chance: float = CHANCE) -> tuple[float, float]:
    """One-sample t-test of values > chance: (t, one-sided p). Zero spread: p = 0 if above, else 1."""
    from scipy.stats import ttest_1samp

    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2 or np.ptp(values) == 0:
        mean = values.mean() if len(values) else chance
        return (math.inf if mean > chance else -math.inf if mean < chance else 0.0), float(mean <= chance)
    result = ttest_1samp(values, chance, alternative="greater")
    return float(result.statistic), float(result.pvalue)


@dataclass
class _Problem:
    target: str
    seed: int
    train: np.ndarray
    test: np.ndarray


def _plan_problems(Y: pd.DataFrame, targets: Sequence[str], seeds: int, test_size: float,
                   seed: int) -> tuple[list[_Problem], dict[str, str]]:
    problems, skipped = [], {}
    for t_index, target in enumerate(targets):
        labels = Y[target].to_numpy()
        try:
            for s in range(seeds):
                # Seeds differ per target and run so that targets do not share subsamples by accident.
                tr, te = balanced_stratified_split(labels, test_size=test_size,
                                                   seed=seed * 1_000_003 + t_index * 1009 + s)
                problems.append(_Problem(target, s, tr, te))
        except UserError as err:
            skipped[target] = str(err)
    return problems, skipped


def probe_features(X: np.ndarray | Tensor, Y: pd.DataFrame, *, seeds: int = 10, test_size: float = 0.3,
                   targets: Sequence[str] = TARGETS, device: str | torch.device = "cpu", seed: int = 0,
                   C: float = 1.0, max_iter: int = 1000, tol: float = 1e-4,
                   dtype: torch.dtype = torch.float32) -> pd.DataFrame:
    """Balanced logistic probes of every target, `seeds` splits each; one row per target.

    Columns: target, n_pos, n_neg, n_train, n_test, acc_mean, acc_std, auc_mean, auc_std, t, p_value,
    accs (the per-seed accuracies). A target with < 2 rows in a class gets NaNs and a `note`."""
    X = torch.as_tensor(X).detach().cpu().numpy()
    X, dropped = drop_inactive_units(X)
    if X.shape[1] == 0:
        raise UserError("ImageNet-X probe: every feature unit is constant over the annotated images")
    problems, skipped = _plan_problems(Y, targets, seeds, test_size, seed)
    accs, aucs = _fit_problems(X, Y, problems, device=device, C=C, max_iter=max_iter, tol=tol, dtype=dtype)
    rows = []
    for target in targets:
        labels = Y[target].to_numpy()
        row = {"target": target, "n_pos": int((labels == 1).sum()), "n_neg": int((labels == 0).sum())}
        idx = [i for i, p in enumerate(problems) if p.target == target]
        if not idx:
            rows.append({**row, "note": skipped.get(target, "no problems")})
            continue
        a, u = accs[idx], aucs[idx]
        t, p = t_test_vs_chance(a)
        rows.append({**row, "n_train": len(problems[idx[0]].train), "n_test": len(problems[idx[0]].test),
                     "acc_mean": float(a.mean()), "acc_std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
                     "auc_mean": float(u.mean()), "auc_std": float(u.std(ddof=1)) if len(u) > 1 else 0.0,
                     "t": t, "p_value": p, "accs": [round(float(v), 6) for v in a], "note": ""})
    table = pd.DataFrame(rows)
    table.attrs["dropped_units"] = dropped
    table.attrs["units"] = int(X.shape[1])
    return table


def _fit_problems(X: np.ndarray, Y: pd.DataFrame, problems: list[_Problem], *, device, C: float, max_iter: int,
                  tol: float, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """One batched fit of every (target, seed) problem; test accuracy and ROC-AUC per problem."""
    if not problems:
        return np.zeros(0), np.zeros(0)
    Xt = torch.as_tensor(X, dtype=dtype, device=device)
    n = Xt.shape[0]
    labels = torch.as_tensor(np.stack([Y[p.target].to_numpy() for p in problems]), dtype=dtype, device=device)
    train = weights_from_index([p.train for p in problems], n, Xt)
    center, scale = standardize_stats(Xt, train)
    fit = fit_logistic_batched(Xt, labels, sample_weight=train, center=center, scale=scale, C=C,
                               max_iter=max_iter, tol=tol)
    if not bool(fit.converged.all()):
        print(f"[imagenetx] {int((~fit.converged).sum())}/{len(problems)} logistic fits stopped before "
              f"tol={tol} (max_iter={max_iter} or no further decrease)", file=sys.stderr)
    scores = decision_function_batched(Xt, fit, center, scale).cpu().numpy()
    y = labels.cpu().numpy()
    accs = np.array([((scores[m, p.test] > 0) == (y[m, p.test] == 1)).mean() for m, p in enumerate(problems)])
    aucs = np.array([roc_auc(scores[m, p.test], y[m, p.test]) for m, p in enumerate(problems)])
    return accs, aucs


# ---- tables, plot ---------------------------------------------------------------------------------------
def results_table(per_model: dict[str, pd.DataFrame], alpha: float = ALPHA) -> pd.DataFrame:
    """Long table (model, target, ...) with Bonferroni over every tested (target, model) pair.

    Adds p_bonferroni = min(1, p * tests) and significant = p < alpha / tests."""
    frames = [df.assign(model=model) for model, df in per_model.items()]
    if not frames:
        raise UserError("ImageNet-X probe: no models to tabulate")
    table = pd.concat(frames, ignore_index=True)
    if "p_value" not in table:
        table["p_value"] = np.nan
    tested = table["p_value"].notna()
    tests = max(1, int(tested.sum()))
    table["tests"] = tests
    table["p_bonferroni"] = (table["p_value"] * tests).clip(upper=1.0)
    table["significant"] = tested & (table["p_value"] < alpha / tests)
    first = ["model", "target", "acc_mean", "acc_std", "auc_mean", "auc_std", "t", "p_value", "p_bonferroni",
             "significant", "n_pos", "n_neg", "n_train", "n_test"]
    return table[[c for c in first if c in table] + [c for c in table if c not in first]]


def wide_table(table: pd.DataFrame) -> pd.DataFrame:
    """Targets x models: 'acc ± std' with '*' where significant (the markdown summary)."""
    def cell(r) -> str:
        if pd.isna(r.get("acc_mean")):
            return "n/a"
        return f"{r['acc_mean']:.3f} ± {r['acc_std']:.3f}" + ("*" if r["significant"] else "")

    cells = table.assign(cell=table.apply(cell, axis=1))
    wide = cells.pivot(index="target", columns="model", values="cell")
    order = [t for t in TARGETS if t in wide.index] + [t for t in wide.index if t not in TARGETS]
    models = list(dict.fromkeys(table["model"]))
    return wide.loc[order, models]


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub markdown table (pandas' to_markdown needs the optional `tabulate`)."""
    header = [frame.index.name or ""] + [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for idx, row in frame.iterrows():
        lines.append("| " + " | ".join([str(idx)] + [str(v) for v in row.tolist()]) + " |")
    return "\n".join(lines) + "\n"


def _atomic_path(path: Path) -> Path:
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def write_tables(table: pd.DataFrame, out_dir: Path, alpha: float = ALPHA) -> tuple[Path, Path]:
    """imagenetx_probe.csv (long) and imagenetx_probe.md (wide, with the correction stated)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "imagenetx_probe.csv", out_dir / "imagenetx_probe.md"
    tmp = _atomic_path(csv_path)
    table.to_csv(tmp, index=False)
    os.replace(tmp, csv_path)
    tests = int(table["tests"].iloc[0]) if len(table) else 0
    text = (f"Balanced logistic-probe accuracy (mean ± std over seeds); * = above 0.5 by a one-sample "
            f"t-test at alpha {alpha} / {tests} (Bonferroni over targets x models).\n\n" + to_markdown(wide_table(table)))
    tmp = _atomic_path(md_path)
    tmp.write_text(text)
    os.replace(tmp, md_path)
    return csv_path, md_path


def plot_factor_accuracies(table: pd.DataFrame, path: Path) -> Path:
    """Grouped bars (one group per target, one bar per model, std error bars), dashed chance line,
    '*' over significant bars; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(table["model"]))
    targets = [t for t in TARGETS if t in set(table["target"])] + \
        [t for t in dict.fromkeys(table["target"]) if t not in TARGETS]
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(8.0, 0.75 * len(targets) * max(1, len(models)) ** 0.5), 4.2))
    for j, model in enumerate(models):
        rows = table[table["model"] == model].set_index("target").reindex(targets)
        x = np.arange(len(targets)) + (j - (len(models) - 1) / 2) * width
        means, stds = rows["acc_mean"].to_numpy(float), rows["acc_std"].to_numpy(float)
        ax.bar(x, np.nan_to_num(means), width, yerr=np.nan_to_num(stds), label=model, capsize=1.5)
        for xi, m, s, sig in zip(x, means, stds, rows["significant"].fillna(False).to_numpy(bool)):
            if sig and np.isfinite(m):
                ax.text(xi, m + np.nan_to_num(s) + 0.01, "*", ha="center", va="bottom", fontsize=9)
    ax.axhline(CHANCE, color="k", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(np.arange(len(targets)))
    ax.set_xticklabels([t.replace("_", " ") for t in targets], rotation=45, ha="right")
    ax.set_ylabel("balanced probe accuracy")
    ax.set_ylim(0.3, 1.05)
    ax.legend(fontsize=8, ncol=min(len(models) + 1, 4), loc="upper right")
    ax.set_title("ImageNet-X factors decoded linearly from features")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_path(path)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ---- the whole run ---------------------------------------------------------------------------------------
@dataclass
class ImagenetXResult:
    """What `run_imagenetx_probe` hands the tracking module."""

    table: pd.DataFrame
    metrics: dict[str, float]
    artifacts: list[Path]
    annotated: int
    found: dict[str, int] = field(default_factory=dict)  # model -> annotated images found in the shards


def metrics_of(table: pd.DataFrame, found: dict[str, int] | None = None) -> dict[str, float]:
    """{'probe/imagenetx/<model>/<target>': mean accuracy, '.../<target>_auc': mean ROC-AUC, ...}."""
    metrics = {}
    for r in table.itertuples():
        if pd.notna(r.acc_mean):
            metrics[f"{METRIC_PREFIX}/{r.model}/{r.target}"] = float(r.acc_mean)
            metrics[f"{METRIC_PREFIX}/{r.model}/{r.target}_auc"] = float(r.auc_mean)
    for model, count in (found or {}).items():
        metrics[f"{METRIC_PREFIX}/{model}/found_images"] = float(count)
    return metrics


def run_imagenetx_probe(shards_root: Path, models: Iterable[str | ModelSpec], *, out_dir: Path,
                        batch_size: int = 64, device: str = "cpu", seeds: int = 10, seed: int = 0,
                        which_factor: str = "multi", filter_prototypes: bool = False, loader_workers: int = 2,
                        max_images: int | None = None, alpha: float = ALPHA, save_features: bool = False,
                        progress: bool = True) -> ImagenetXResult:
    """Features of the annotated val images for every model -> probes -> table, plot, metrics.

    shards_root: the folder written by `linrep data imagenet` (its val split is read in order).
    models: model specs (see ModelSpec). Writes imagenetx_probe.{csv,md,png} under out_dir."""
    out_dir = Path(out_dir)
    specs = [parse_model_spec(m) if isinstance(m, str) else m for m in models]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise UserError(f"ImageNet-X probe: two models share the label '{_first_duplicate(labels)}' "
                        "(add ,label=NAME to a model spec)")
    urls = val_shard_urls(shards_root)
    annotations = load_imagenetx_annotations(which_factor, filter_prototypes)
    wanted = set(annotations["key"])
    per_model, found = {}, {}
    for spec in specs:
        extractor = create_extractor(spec, device, seed)
        keys, feats = extract_features(urls, extractor, wanted, batch_size=batch_size,
                                       loader_workers=loader_workers, max_images=max_images, progress=progress)
        X, Y, found[spec.label] = join_features(keys, feats, annotations)
        if progress:
            print(f"[imagenetx] {spec.label}: {found[spec.label]:,} of {len(annotations):,} annotated images "
                  f"found in the val shards; {X.shape[1]} units", file=sys.stderr, flush=True)
        if save_features:
            _save_features(out_dir / f"features-{spec.label}.npz", Y["key"].to_numpy(), X)
        per_model[spec.label] = probe_features(X, Y, seeds=seeds, device=device, seed=seed)
        del X, feats
    table = results_table(per_model, alpha)
    csv_path, md_path = write_tables(table, out_dir, alpha)
    png_path = plot_factor_accuracies(table, out_dir / "imagenetx_probe.png")
    return ImagenetXResult(table, metrics_of(table, found), [csv_path, md_path, png_path], len(annotations), found)


def _first_duplicate(items: list[str]) -> str:
    seen = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return ""


def _save_features(path: Path, keys: np.ndarray, X: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_path(path)
    np.savez(tmp, keys=keys.astype(str), features=X)
    os.replace(tmp, path)


# ---- per-checkpoint probe (the probe actor of an ImageNet training run) ------------------------------
CHECKPOINT_SEEDS = 10
EVAL_BATCH = 256


@torch.no_grad()
def _collect_val(model, cfg, manifest, wanted: set[str], labels, max_samples: int) -> dict:
    """Top-1/top-5 hits on the first `max_samples` val images; features of the annotated ones."""
    from trainer.data.imagenet import imagenet_eval_transform
    from trainer.data.stream import make_eval_loader

    loader = make_eval_loader(cfg.data, manifest, "val", batch_size=EVAL_BATCH, max_samples=max_samples,
                              transform=imagenet_eval_transform(cfg.data.image_size))
    device = next(model.parameters()).device
    hits1, hits5, keys, feats = [], [], [], []
    for batch in loader:
        x = batch["image"].to(device)
        features = model.features(x)
        logits = model(x).float().cpu()
        y = labels(batch)
        top = logits.topk(min(5, logits.shape[1]), dim=-1).indices
        hits1.append(top[:, 0] == y)
        hits5.append((top == y[:, None]).any(-1))
        keep = [i for i, k in enumerate(batch["key"]) if k in wanted]
        keys.extend(batch["key"][i] for i in keep)
        feats.append(features[keep].float().cpu())
    return {"top1": torch.cat(hits1), "top5": torch.cat(hits5), "keys": keys,
            "features": torch.cat(feats) if feats else torch.zeros(0, 0)}


def checkpoint_probe(model, cfg, state: dict) -> dict[str, float]:
    """Figures of one ImageNet checkpoint: val/acc (+ top-5) at the run's label granularity and,
    on the annotated images among the first probe.max_eval_samples val images, the ImageNet-X
    probe (probe/imagenetx/<target> = mean accuracy over 10 seeds). Tables go to state["artifacts"]."""
    from trainer.data.labels import create_label_scheme
    from trainer.data.shards import load_manifest

    if "manifest" not in state:  # fixed for the run: built once per probe actor
        state["manifest"] = load_manifest(cfg.data.root)
        state["imagenetx_annotations"] = load_imagenetx_annotations()
    manifest, annotations = state["manifest"], state["imagenetx_annotations"]
    labels = create_label_scheme(cfg.data, manifest, cfg.data_seed)
    val = _collect_val(model, cfg, manifest, set(annotations["key"]), labels, cfg.probe.max_eval_samples)
    figures = {"val/acc": float(val["top1"].float().mean())}
    if labels.num_classes > 5:
        figures["val/acc_top5"] = float(val["top5"].float().mean())
    figures[f"{METRIC_PREFIX}/found_images"] = float(len(val["keys"]))
    if len(val["keys"]) < 20:  # not ImageNet validation images (or too few): nothing to probe
        return figures
    X, Y, _ = join_features(val["keys"], val["features"], annotations)
    device = next(model.parameters()).device
    table = results_table({"checkpoint": probe_features(X, Y, seeds=CHECKPOINT_SEEDS, device=device,
                                                        seed=cfg.run.seed)})
    for r in table.dropna(subset=["acc_mean"]).itertuples():
        figures[f"{METRIC_PREFIX}/{r.target}"] = float(r.acc_mean)
        figures[f"{METRIC_PREFIX}/{r.target}_auc"] = float(r.auc_mean)
    figures[f"{METRIC_PREFIX}/significant_targets"] = float(table["significant"].sum())
    state["artifacts"] = {"imagenetx.md": to_markdown(wide_table(table)),
                          "imagenetx.csv": table.drop(columns=["accs"]).to_csv(index=False)}
    return figures


# ---- command line: `linrep probe imagenetx ...` ---------------------------------------------------------
def build_cli_parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="linrep probe imagenetx",
        description="ImageNet-X factor probe of one or more models on the val shards of `linrep data imagenet`.")
    p.add_argument("shards", help="folder with the ImageNet shards + manifest.json")
    p.add_argument("--model", "-m", action="append", required=True, metavar="SPEC",
                   help="repeatable: checkpoint:DIR | timm:NAME[,file=WEIGHTS] | timm_random:NAME | "
                        "pixels[:DIM][,size=224][,seed=0]; add ,label=NAME to rename")
    p.add_argument("--out", default="results/imagenetx", help="folder for the CSV/markdown tables and the plot")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="image-decoding processes")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="base seed of splits and random models")
    p.add_argument("--max-images", type=int, default=None, help="probe only the first N annotated images")
    p.add_argument("--annotations", choices=["multi", "top"], default="multi",
                   help="ImageNet-X labels: every marked factor (multi) or only the top factor")
    p.add_argument("--filter-prototypes", action="store_true", help="drop the annotation prototype images")
    p.add_argument("--save-features", action="store_true", help="also write features-<model>.npz")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlruns)")
    p.add_argument("--no-log", action="store_true", help="do not log to MLflow")
    return p


def cli_main(argv: list[str]) -> int:
    """Run the probe, print the table, log metrics + artifacts to MLflow (experiment 'imagenet')."""
    args = build_cli_parser().parse_args(argv)
    result = run_imagenetx_probe(Path(args.shards), args.model, out_dir=Path(args.out), batch_size=args.batch_size,
                                 device=args.device, seeds=args.seeds, seed=args.seed,
                                 which_factor=args.annotations, filter_prototypes=args.filter_prototypes,
                                 loader_workers=args.workers, max_images=args.max_images,
                                 save_features=args.save_features)
    print(to_markdown(wide_table(result.table)))
    print(f"annotated images found: {', '.join(f'{m} {n:,}' for m, n in result.found.items())} "
          f"of {result.annotated:,}; tables and plot in {args.out}")
    if not args.no_log:
        run_id = _log_to_mlflow(result, args)
        print(f"logged to MLflow run {run_id}")
    return 0


def _log_to_mlflow(result: ImagenetXResult, args) -> str:
    """One run in MLflow experiment 'imagenet', written through trainer.tracking (which owns mlflow)."""
    from trainer.config import TrackingConfig
    from trainer.tracking import MetricLogger, _client, ensure_experiment, git_commit, log_artifact, resolve_uri

    uri = resolve_uri(TrackingConfig(uri=args.tracking_uri))
    client = _client(uri)
    run = client.create_run(ensure_experiment(uri, "imagenet"), run_name="imagenetx-probe",
                            tags={"linrep.kind": "imagenetx-probe", "linrep.git_commit": git_commit() or ""})
    run_id = run.info.run_id
    for key, value in {"models": ",".join(result.found), "seeds": args.seeds, "annotations": args.annotations,
                       "shards": args.shards}.items():
        client.log_param(run_id, key, str(value))
    logger = MetricLogger(uri, run_id, flush_every_s=0)
    logger.log(result.metrics, step=0)
    logger.close()
    for path in result.artifacts:
        log_artifact(uri, run_id, path, "imagenetx")
    client.set_terminated(run_id)
    return run_id
