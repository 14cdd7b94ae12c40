"""Factor probes of image checkpoints (paper section 4.2): decode every ground-truth factor linearly.

For each factor (categorical ones included, as the public code does): a least-squares decoder
(intercept, z-scored target) fitted on training-split features and scored by Pearson r (and R²) on
probe.score_split (validation by default; test for `linrep reproduce dislib`); the same from raw
pixels as the baseline (computed once per probe actor: it does not depend on the checkpoint). Also
the classifier's own validation accuracy (`val/acc`, and `val/acc_top5` with many classes).

The decoders see the first probe.max_train_samples training samples, held in memory; with
probe.max_train_samples=0 the whole training split instead, streamed through the normal equations
(probes.linear.StreamedLeastSquares: X^T X and X^T y summed batch by batch, solved once), and the
scoring split streamed too, so memory does not grow with the split.

Metrics: probe/pearson/<factor>, probe/r2/<factor>, probe/pearson_pixels/<factor>, val/acc.
The factor x {pixels, model} table is left in state["artifacts"] for the actor to log.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from probes.accuracy import accuracy_figures, topk_hits
from probes.linear import LinearFit, StreamedLeastSquares, fit_linear, pearson_r, r2_score
from trainer.config import Config
from trainer.data.labels import create_label_scheme
from trainer.data.shards import Manifest, load_manifest
from trainer.data.stream import make_eval_loader

MAX_PIXEL_DIMS = 4096  # raw pixels up to 64x64x1; larger images are average-pooled to 32x32 for the baseline
PIXEL_SIDE = 32
EVAL_BATCH = 512


def split_limit(n: int) -> int | None:
    """probe.max_*_samples -> a loader's max_samples (0: the whole split)."""
    return n or None


def pixel_inputs(img: torch.Tensor) -> torch.Tensor:
    """The raw-pixel baseline's inputs: the pixels, average-pooled to 32x32 beyond 64x64x1."""
    return img.flatten(1) if img[0].numel() <= MAX_PIXEL_DIMS else F.adaptive_avg_pool2d(img, PIXEL_SIDE).flatten(1)


@torch.no_grad()
def batches(model, cfg: Config, manifest: Manifest, split: str, max_samples: int | None, labels=None):
    """Per batch of a split's first `max_samples` samples (None: all): features, pixels, factors (and
    top-1/top-5 hits with `labels`)."""
    loader = make_eval_loader(cfg.data, manifest, split, batch_size=EVAL_BATCH, max_samples=max_samples)
    device = next(model.parameters()).device
    for batch in loader:
        x = batch["image"].to(device)
        out = {"features": model.features(x).float(), "pixels": pixel_inputs(batch["image"]),
               "factors": batch["factors"]}
        if labels is not None:
            out["top1"], out["top5"] = topk_hits(model(x).float().cpu(), labels(batch))
        yield out


def collect(model, cfg: Config, manifest: Manifest, split: str, max_samples: int | None, labels=None) -> dict[str, torch.Tensor]:
    """Features, pixels, factors (and logits-derived hits) of a split's first `max_samples` samples."""
    parts: dict[str, list[torch.Tensor]] = {}
    for b in batches(model, cfg, manifest, split, max_samples, labels):
        for k, v in b.items():
            parts.setdefault(k, []).append(v.cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def decode_factors(train_x: torch.Tensor, train_f: torch.Tensor, val_x: torch.Tensor, val_f: torch.Tensor,
                   names: list[str]) -> dict[str, tuple[float, float]]:
    """{factor: (pearson r, R²)} of linear decoders fitted on train, scored on validation."""
    mean, std = train_f.mean(0), train_f.std(0).clamp(min=1e-12)
    target_train, target_val = (train_f - mean) / std, (val_f - mean) / std   # z-scored factors
    # drop constant feature columns (dead units) before the normal equations
    live = train_x.std(0) > 1e-8
    fit = fit_linear(train_x[:, live], target_train)
    pred = fit.predict(val_x[:, live])
    return factor_scores(pred, target_val, std, names)


def factor_scores(pred: torch.Tensor, target: torch.Tensor, std: torch.Tensor, names: list[str]) -> dict[str, tuple[float, float]]:
    """{factor: (pearson r, R²)} of z-scored predictions against z-scored factors; a factor with one
    value in the training split (dSprites colour) has nothing to decode and is left out."""
    out = {}
    for j, name in enumerate(names):
        if float(std[j]) <= 1e-12:
            continue
        out[name] = (pearson_r(pred[:, j], target[:, j]), r2_score(target[:, j:j + 1], pred[:, j:j + 1]))
    return out


def streamed_decoder(fit: StreamedLeastSquares) -> tuple[LinearFit, torch.Tensor, torch.Tensor]:
    """A fit of the z-scored factors on the live columns (as decode_factors), and the factors' mean
    and std over the streamed split."""
    mean, std = fit.y_mean(), fit.y_std().clamp(min=1e-12)
    raw = fit.fit(fit.x_std() > 1e-8)
    return LinearFit(raw.weight / std, (raw.bias - mean) / std), mean, std


def decode_factors_streamed(train: Iterable[dict], scored: Iterable[dict], keys: list[str], names: list[str],
                            device=None) -> dict[str, dict[str, tuple[float, float]]]:
    """decode_factors over batches, for each input `key` of them (features, pixels): the decoder
    fitted on every training batch by streamed normal equations (no n x p matrix is held), scored on
    every batch of `scored`. Batches are dicts holding the keys and "factors"."""
    accs = {key: StreamedLeastSquares(device) for key in keys}
    for b in train:
        for key, acc in accs.items():
            acc.add(b[key], b["factors"])
    fits = {key: streamed_decoder(acc) for key, acc in accs.items()}
    preds: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
    factors = []
    for b in scored:
        for key, (fit, _, _) in fits.items():
            preds[key].append(fit.predict(b[key].to(fit.weight.device)).cpu())
        factors.append(b["factors"].double())
    f = torch.cat(factors)
    out = {}
    for key, (_, mean, std) in fits.items():
        mean, std = mean.cpu(), std.cpu()
        out[key] = factor_scores(torch.cat(preds[key]), (f - mean) / std, std, names)
    return out


def streamed_figures(model, cfg: Config, manifest: Manifest, names: list[str], labels,
                     with_pixels: bool) -> tuple[dict, dict | None, dict[str, torch.Tensor]]:
    """probe.max_train_samples=0: model (and, with_pixels, raw-pixel) decoders fitted on the whole
    training split in one streamed pass, scored on probe.score_split in a second one. Returns the
    model's and the pixels' {factor: (r, R²)} and the hits of the scoring pass when it is val."""
    split = cfg.probe.score_split
    hits: dict[str, list[torch.Tensor]] = {}

    def scored():
        for b in batches(model, cfg, manifest, split, split_limit(cfg.probe.max_eval_samples),
                         labels if split == "val" else None):
            for k in ("top1", "top5"):
                if k in b:
                    hits.setdefault(k, []).append(b[k])
            yield b

    keys = ["features", "pixels"] if with_pixels else ["features"]
    res = decode_factors_streamed(batches(model, cfg, manifest, "train", None), scored(), keys, names,
                                  device=next(model.parameters()).device)
    return res["features"], res.get("pixels"), {k: torch.cat(v) for k, v in hits.items()}


def factor_table(manifest: Manifest, model_res: dict, pixel_res: dict) -> str:
    kinds = {f["name"]: f["kind"] for f in manifest.factors}
    rows = ["| factor | kind | pixels r | model r | model R² |", "|---|---|---|---|---|"]
    for name, (r, r2) in model_res.items():
        note = " (periodic: not expected linear)" if kinds.get(name) == "periodic" else ""
        rows.append(f"| {name} | {kinds.get(name, '?')}{note} | {pixel_res[name][0]:.3f} | {r:.3f} | {r2:.3f} |")
    return "\n".join(rows) + "\n"


def factor_figures(model, cfg: Config, state: dict) -> dict[str, float]:
    if "manifest" not in state:
        state["manifest"] = load_manifest(cfg.data.root)
    manifest = state["manifest"]
    names = [f["name"] for f in manifest.factors]
    labels = create_label_scheme(cfg.data, manifest, cfg.data_seed)
    split, eval_n = cfg.probe.score_split, split_limit(cfg.probe.max_eval_samples)
    if cfg.probe.max_train_samples == 0:  # the whole training split, streamed (reproduce dislib)
        res, pix, hits = streamed_figures(model, cfg, manifest, names, labels, "pixel_res" not in state)
        if pix is not None:
            state["pixel_res"] = pix
    else:
        train = collect(model, cfg, manifest, "train", cfg.probe.max_train_samples)
        scored = collect(model, cfg, manifest, split, eval_n, labels=labels if split == "val" else None)
        res = decode_factors(train["features"], train["factors"], scored["features"], scored["factors"], names)
        if "pixel_res" not in state:  # the raw-pixel baseline does not change between checkpoints
            state["pixel_res"] = decode_factors(train["pixels"], train["factors"], scored["pixels"],
                                                scored["factors"], names)
        hits = {k: scored[k] for k in ("top1", "top5") if k in scored}
    if "top1" not in hits:  # decoders scored on test: the accuracy (and run.stop_at) stays validation's
        hits = {k: torch.cat(v) for k, v in _hits(model, cfg, manifest, eval_n, labels).items()}
    pix = state["pixel_res"]
    figures = accuracy_figures(hits["top1"], hits["top5"], labels.num_classes)
    for name, (r, r2) in res.items():
        figures[f"probe/pearson/{name}"] = r
        figures[f"probe/r2/{name}"] = r2
        figures[f"probe/pearson_pixels/{name}"] = pix[name][0]
    table = factor_table(manifest, res, pix)
    state["artifacts"] = {"factors.md": table, "factors.csv": _csv(table)}
    return figures


def _hits(model, cfg: Config, manifest: Manifest, max_samples: int | None, labels) -> dict[str, list[torch.Tensor]]:
    out: dict[str, list[torch.Tensor]] = {"top1": [], "top5": []}
    for b in batches(model, cfg, manifest, "val", max_samples, labels):
        out["top1"].append(b["top1"])
        out["top5"].append(b["top5"])
    return out


def _csv(markdown: str) -> str:
    lines = [l for l in markdown.strip().splitlines() if not l.startswith("|---")]
    return "\n".join(",".join(c.strip() for c in l.strip("|").split("|")) for l in lines) + "\n"
