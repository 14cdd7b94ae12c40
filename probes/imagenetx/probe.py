"""The ImageNet-X probe of one or more models, end to end: features of the annotated validation
images -> probes -> tables, plot and metrics (``run_imagenetx_probe``)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pandas as pd

from probes.imagenetx.annotations import (
    DEFAULT_FILTER_PROTOTYPES,
    DEFAULT_WHICH_FACTOR,
    join_features,
    load_imagenetx_annotations,
)
from probes.imagenetx.extractors import ModelSpec, create_extractor, parse_model_spec
from probes.imagenetx.features import extract_features, val_shard_urls, write_features
from probes.imagenetx.plots import plot_factor_accuracies
from probes.imagenetx.statistics import ALPHA, probe_features, results_table
from probes.imagenetx.tables import metrics_of, write_tables
from trainer.errors import UserError


@dataclass
class ImagenetXResult:
    """What `run_imagenetx_probe` hands its caller (the command line logs it with probes.imagenetx.record)."""

    table: pd.DataFrame
    metrics: dict[str, float]
    artifacts: list[Path]
    annotated: int
    found: dict[str, int] = field(default_factory=dict)  # model -> annotated images found in the shards


def run_imagenetx_probe(shards_root: Path, models: Iterable[str | ModelSpec], *, out_dir: Path,
                        batch_size: int = 64, device: str = "cpu", seeds: int = 10, seed: int = 0,
                        which_factor: str = DEFAULT_WHICH_FACTOR, filter_prototypes: bool = DEFAULT_FILTER_PROTOTYPES,
                        class_split: str = "mean", loader_workers: int = 2, max_images: int | None = None,
                        alpha: float = ALPHA, alternative: str = "two-sided", unit_rule: str = "nonpositive-mean",
                        error: str = "sem", tests: int | None = None, footnote: str = "",
                        bonferroni: str = "targets x models", stem: str = "imagenetx_probe",
                        title: str | None = None, save_features: bool = False,
                        progress: bool = True) -> ImagenetXResult:
    """Features of the annotated val images for every model -> probes -> table, plot, metrics.

    shards_root: the folder written by `linrep data imagenet` (its val split is read in order).
    models: model specs (see ModelSpec). Statistics default to the public code's (two-sided t-test,
    units with mean <= 0 dropped, SEM; see probes.imagenetx.statistics); tests: the Bonferroni count
    (None: the tested pairs of this run). Writes <stem>.{csv,md,png} under out_dir."""
    out_dir = Path(out_dir)
    specs = [parse_model_spec(m) if isinstance(m, str) else m for m in models]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise UserError(f"ImageNet-X probe: two models share the label '{_first_duplicate(labels)}' "
                        "(add ,label=NAME to a model spec)")
    urls = val_shard_urls(shards_root)
    annotations = load_imagenetx_annotations(which_factor, filter_prototypes, class_split)
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
            write_features(out_dir / f"features-{spec.label}.npz", Y["key"].to_numpy(), X)
        per_model[spec.label] = probe_features(X, Y, seeds=seeds, device=device, seed=seed,
                                               alternative=alternative, unit_rule=unit_rule)
        del X, feats
    table = results_table(per_model, alpha, tests)
    csv_path, md_path = write_tables(table, out_dir, alpha, error=error, alternative=alternative, footnote=footnote,
                                     bonferroni=bonferroni, stem=stem)
    png_path = plot_factor_accuracies(table, out_dir / f"{stem}.png", error,
                                      **({"title": title} if title else {}))
    return ImagenetXResult(table, metrics_of(table, found), [csv_path, md_path, png_path], len(annotations), found)


def _first_duplicate(items: list[str]) -> str:
    seen = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return ""
