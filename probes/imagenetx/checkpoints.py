"""The ImageNet-X probe of one checkpoint of an ImageNet training run (called by the probe actor)."""

from __future__ import annotations

import torch

from probes.accuracy import accuracy_figures, topk_hits
from probes.imagenetx.annotations import join_features, load_imagenetx_annotations
from probes.imagenetx.statistics import probe_features, results_table
from probes.imagenetx.tables import METRIC_PREFIX, to_markdown, wide_table

CHECKPOINT_SEEDS = 10
EVAL_BATCH = 256
MIN_FOUND = 20  # fewer annotated images than this: not ImageNet validation images, nothing to probe


@torch.no_grad()
def collect_val(model, cfg, manifest, wanted: set[str], labels, max_samples: int) -> dict:
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
        top1, top5 = topk_hits(model(x).float().cpu(), labels(batch))
        hits1.append(top1)
        hits5.append(top5)
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
    val = collect_val(model, cfg, manifest, set(annotations["key"]), labels, cfg.probe.max_eval_samples or None)
    figures = accuracy_figures(val["top1"], val["top5"], labels.num_classes)
    figures[f"{METRIC_PREFIX}/found_images"] = float(len(val["keys"]))
    if len(val["keys"]) < MIN_FOUND:
        return figures
    X, Y, _ = join_features(val["keys"], val["features"], annotations)
    device = next(model.parameters()).device
    table = results_table({"checkpoint": probe_features(X, Y, seeds=CHECKPOINT_SEEDS, device=device,
                                                        seed=cfg.run.seed)})
    for r in table.dropna(subset=["acc_mean"]).itertuples():
        figures[f"{METRIC_PREFIX}/{r.target}"] = float(r.acc_mean)
        figures[f"{METRIC_PREFIX}/{r.target}_auc"] = float(r.auc_mean)
    # The t-test is two-sided (the public code's): count only the targets significantly above chance.
    figures[f"{METRIC_PREFIX}/significant_targets"] = float((table["significant"] & (table["acc_mean"] > 0.5)).sum())
    state["artifacts"] = {"imagenetx.md": to_markdown(wide_table(table)),
                          "imagenetx.csv": table.drop(columns=["accs"]).to_csv(index=False)}
    return figures
