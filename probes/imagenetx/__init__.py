"""ImageNet-X probe: do the features of a model linearly encode ImageNet-X's factors of variation?

Protocol (Reizinger et al. 2025, section 4.3, after Idrissi et al. 2022's annotations):

1. features of the annotated ImageNet validation images, joined with the annotations shipped in
   the ``imagenet-x`` package by file name (the shards' ``__key__`` is the file stem);
   The annotations are imagenet_x.load_annotations()'s defaults, as the paper's public code uses
   them: the top factor per image, prototype images filtered;
2. units whose mean activation is <= 0 are dropped (the public code's rule; dead ReLU units among them);
3. per target (16 binary factors + the class binarised as class > its mean, the public code's) and
   seed: classes balanced by subsampling the majority, stratified 70/30 split, features z-scored
   with the training rows' statistics, L2 logistic regression (C=1), test accuracy and ROC-AUC;
4. per target: mean ± SEM over seeds, two-sided one-sample t-test of the accuracies against 0.5,
   Bonferroni-corrected at alpha 0.05 over targets x models (`linrep reproduce imagenetx`: the
   paper's 17 x 5). docs/science.md (ImageNet-X) lists each choice and where it comes from.

One module per concern:

- ``annotations``: the ImageNet-X annotations and their join with feature rows;
- ``extractors``: model specs and the feature-extractor registry (``checkpoint``, ``timm``,
  ``timm_random``, ``pixels``);
- ``features``: reading the val shards and extracting (and saving) features;
- ``statistics``: the batched logistic probes, ROC-AUC, t-test and Bonferroni;
- ``tables`` / ``plots``: the CSV and markdown tables, the metric names, the bar chart;
- ``probe``: ``run_imagenetx_probe``, the whole probe of one or more models;
- ``checkpoints``: ``checkpoint_probe``, the probe actor's figures of an ImageNet checkpoint;
- ``record``: the MLflow run of a probe (``log_probe_run``, through trainer.tracking).

The command line (`linrep probe imagenetx ...`) lives in linrep/imagenetx_cli.py: it runs
``run_imagenetx_probe`` and logs its metrics and artifacts with ``log_probe_run``.
"""

from probes.imagenetx.annotations import CLASS_TARGET, FACTORS, TARGETS, join_features, load_imagenetx_annotations
from probes.imagenetx.checkpoints import checkpoint_probe
from probes.imagenetx.extractors import (
    Extractor,
    ModelSpec,
    create_extractor,
    list_extractors,
    parse_model_spec,
    register_extractor,
)
from probes.imagenetx.features import extract_features, val_shard_urls, write_features
from probes.imagenetx.plots import plot_factor_accuracies
from probes.imagenetx.probe import ImagenetXResult, run_imagenetx_probe
from probes.imagenetx.record import log_probe_run
from probes.imagenetx.statistics import (
    ALPHA,
    CHANCE,
    drop_inactive_units,
    probe_features,
    results_table,
    roc_auc,
    sem,
    t_test_vs_chance,
)
from probes.imagenetx.tables import METRIC_PREFIX, metrics_of, to_markdown, wide_table, write_tables

__all__ = [
    "ALPHA", "CHANCE", "CLASS_TARGET", "FACTORS", "METRIC_PREFIX", "TARGETS",
    "Extractor", "ImagenetXResult", "ModelSpec",
    "checkpoint_probe", "create_extractor", "drop_inactive_units", "extract_features", "join_features",
    "list_extractors", "load_imagenetx_annotations", "log_probe_run", "metrics_of", "parse_model_spec",
    "plot_factor_accuracies", "probe_features", "register_extractor", "results_table", "roc_auc",
    "run_imagenetx_probe", "sem", "t_test_vs_chance", "to_markdown", "val_shard_urls", "wide_table",
    "write_features", "write_tables",
]
