"""`linrep probe imagenetx SHARDS -m SPEC [-m SPEC ...]`: the ImageNet-X factor probe of one or more
models on the val shards of `linrep data imagenet`; prints the table and logs one MLflow run
(experiment 'imagenet') unless --no-log. Wired by linrep/cli.py (`linrep probe imagenetx ...`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def build_cli_parser() -> argparse.ArgumentParser:
    import torch

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
    p.add_argument("--annotations", choices=["top", "multi"], default="top",
                   help="ImageNet-X labels: only the top factor per image (imagenet_x's default, the paper's "
                        "public code) or every marked factor (multi)")
    p.add_argument("--keep-prototypes", action="store_true",
                   help="keep the annotation prototype images (imagenet_x's default and the paper's code drop them)")
    p.add_argument("--class-split", choices=["mean", "500"], default="mean",
                   help="class_binary: class > the mean class of the annotations (public code) or class >= 500")
    p.add_argument("--alternative", choices=["two-sided", "greater"], default="two-sided",
                   help="t-test of the accuracies against 0.5 (the public code: two-sided)")
    p.add_argument("--drop-units", choices=["nonpositive-mean", "constant"], default="nonpositive-mean",
                   help="which feature units to drop: mean activation <= 0 (public code) or only constant ones")
    p.add_argument("--error", choices=["sem", "std"], default="sem", help="error bars and the table's ± (public: SEM)")
    p.add_argument("--save-features", action="store_true", help="also write features-<model>.npz")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlruns)")
    p.add_argument("--no-log", action="store_true", help="do not log to MLflow")
    return p


def cli_main(argv: list[str]) -> int:
    """Run the probe, print the table, log metrics + artifacts to MLflow (experiment 'imagenet')."""
    from probes.imagenetx import log_probe_run, run_imagenetx_probe, to_markdown, wide_table
    from trainer.config import TrackingConfig
    from trainer.tracking import resolve_uri

    args = build_cli_parser().parse_args(argv)
    result = run_imagenetx_probe(Path(args.shards), args.model, out_dir=Path(args.out), batch_size=args.batch_size,
                                 device=args.device, seeds=args.seeds, seed=args.seed,
                                 which_factor=args.annotations, filter_prototypes=not args.keep_prototypes,
                                 class_split=args.class_split, alternative=args.alternative,
                                 unit_rule=args.drop_units, error=args.error,
                                 loader_workers=args.workers, max_images=args.max_images,
                                 save_features=args.save_features)
    print(to_markdown(wide_table(result.table, args.error)))
    print(f"annotated images found: {', '.join(f'{m} {n:,}' for m, n in result.found.items())} "
          f"of {result.annotated:,}; tables and plot in {args.out}")
    if not args.no_log:
        uri = resolve_uri(TrackingConfig(uri=args.tracking_uri))
        run_id = log_probe_run(uri, result, {"seeds": args.seeds, "annotations": args.annotations,
                                             "prototypes": "kept" if args.keep_prototypes else "filtered",
                                             "class_split": args.class_split, "alternative": args.alternative,
                                             "drop_units": args.drop_units, "error": args.error,
                                             "shards": args.shards})
        print(f"logged to MLflow run {run_id}")
    return 0
