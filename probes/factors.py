"""Factor probes of image checkpoints (paper section 4.2): decode every ground-truth factor linearly.

For each factor: a least-squares decoder (intercept, z-scored target) fitted on training-split
features and scored on validation features by Pearson r (and R²); the same from raw pixels as the
baseline (computed once per probe actor: it does not depend on the checkpoint). Also the
classifier's own validation accuracy (`val/acc`, and `val/acc_top5` with many classes).

Metrics: probe/pearson/<factor>, probe/r2/<factor>, probe/pearson_pixels/<factor>, val/acc.
The factor x {pixels, model} table is left in state["artifacts"] for the actor to log.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from probes.accuracy import accuracy_figures, topk_hits
from probes.linear import fit_linear, pearson_r, r2_score
from trainer.config import Config
from trainer.data.labels import create_label_scheme
from trainer.data.shards import Manifest, load_manifest
from trainer.data.stream import make_eval_loader

MAX_PIXEL_DIMS = 4096  # raw pixels up to 64x64x1; larger images are average-pooled to 32x32 for the baseline
PIXEL_SIDE = 32
EVAL_BATCH = 512


@torch.no_grad()
def collect(model, cfg: Config, manifest: Manifest, split: str, max_samples: int, labels=None) -> dict[str, torch.Tensor]:
    """Features, pixels, factors (and logits-derived hits) of a split's first `max_samples` samples."""
    loader = make_eval_loader(cfg.data, manifest, split, batch_size=EVAL_BATCH, max_samples=max_samples)
    device = next(model.parameters()).device
    feats, pixels, factors, top1, top5 = [], [], [], [], []
    for batch in loader:
        x = batch["image"].to(device)
        feats.append(model.features(x).float().cpu())
        img = batch["image"]
        pixels.append(img.flatten(1) if img[0].numel() <= MAX_PIXEL_DIMS
                      else F.adaptive_avg_pool2d(img, PIXEL_SIDE).flatten(1))
        factors.append(batch["factors"])
        if labels is not None:
            hits1, hits5 = topk_hits(model(x).float().cpu(), labels(batch))
            top1.append(hits1)
            top5.append(hits5)
    out = {"features": torch.cat(feats), "pixels": torch.cat(pixels), "factors": torch.cat(factors)}
    if top1:
        out["top1"], out["top5"] = torch.cat(top1), torch.cat(top5)
    return out


def decode_factors(train_x: torch.Tensor, train_f: torch.Tensor, val_x: torch.Tensor, val_f: torch.Tensor,
                   names: list[str]) -> dict[str, tuple[float, float]]:
    """{factor: (pearson r, R²)} of linear decoders fitted on train, scored on validation."""
    mean, std = train_f.mean(0), train_f.std(0).clamp(min=1e-12)
    target_train, target_val = (train_f - mean) / std, (val_f - mean) / std   # z-scored factors
    # drop constant feature columns (dead units) before the normal equations
    live = train_x.std(0) > 1e-8
    fit = fit_linear(train_x[:, live], target_train)
    pred = fit.predict(val_x[:, live])
    out = {}
    for j, name in enumerate(names):
        if float(std[j]) <= 1e-12:  # a factor with one value (dSprites colour) has nothing to decode
            continue
        out[name] = (pearson_r(pred[:, j], target_val[:, j]), r2_score(target_val[:, j:j + 1], pred[:, j:j + 1]))
    return out


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
    train = collect(model, cfg, manifest, "train", cfg.probe.max_train_samples)
    val = collect(model, cfg, manifest, "val", cfg.probe.max_eval_samples, labels=labels)
    res = decode_factors(train["features"], train["factors"], val["features"], val["factors"], names)
    if "pixel_res" not in state:  # the raw-pixel baseline does not change between checkpoints
        state["pixel_res"] = decode_factors(train["pixels"], train["factors"], val["pixels"], val["factors"], names)
    pix = state["pixel_res"]
    figures = accuracy_figures(val["top1"], val["top5"], labels.num_classes)
    for name, (r, r2) in res.items():
        figures[f"probe/pearson/{name}"] = r
        figures[f"probe/r2/{name}"] = r2
        figures[f"probe/pearson_pixels/{name}"] = pix[name][0]
    table = factor_table(manifest, res, pix)
    state["artifacts"] = {"factors.md": table, "factors.csv": _csv(table)}
    return figures


def _csv(markdown: str) -> str:
    lines = [l for l in markdown.strip().splitlines() if not l.startswith("|---")]
    return "\n".join(",".join(c.strip() for c in l.strip("|").split("|")) for l in lines) + "\n"
