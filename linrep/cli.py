"""linrep's command line: parse, build a config, call one function of the packages below.

    linrep train PRESET|FILE [key.sub=value ...]   train (+ probe actor) through Ray Train
    linrep probe RUN_ID | probe imagenetx ...      re-probe a run's checkpoints / ImageNet-X probe
    linrep sweep SPEC [key=value ...]              Ray Tune sweep over copies of a base config
    linrep reproduce synthetic [--quick] [--plan] the paper's synthetic ablations
    linrep reproduce dislib [--root DIR] [--quick] the paper's DisLib table (MLP, CNN, pixels)
    linrep reproduce imagenetx --shards DIR ...    the paper's ImageNet-X figure 3
    linrep data dsprites|convert|imagenet ...      write WebDataset shards + manifest
    linrep submit -- COMMAND ... / linrep jobs     Ray Jobs on a cluster
    linrep bench [name ...]                        benchmarks, printed as ratios
    linrep ui                                      the MLflow UI on 127.0.0.1
    linrep presets                                 list presets

Bad input ends with one line on stderr and exit 2; a runtime fault with exit 1; --debug shows
the traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from trainer.errors import RuntimeFault, UserError


def _quiet_ray() -> None:
    """Environment of long-running commands: deduplicated Ray logs, and MLflow calls that fail fast
    (one retry, 10 s) instead of retrying for minutes when a tracking server is away."""
    from trainer.tracking import FAST_FAIL_ENV

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    for key, value in FAST_FAIL_ENV.items():
        os.environ.setdefault(key, value)


def format_figures(final: dict[str, float]) -> str:
    from probes.actor import FIGURE_ORDER  # imported here: `linrep --help` needs no torch

    keys = [k for k in FIGURE_ORDER if k in final] + sorted(k for k in final if k not in FIGURE_ORDER
                                                              and k != "probe/seconds")
    width = max((len(k) for k in keys), default=10)
    return "\n".join(f"  {k:<{width}}  {final[k]:.4f}" for k in keys)


# ---- train ---------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from trainer.config import load_config

    # all config errors before torch, Ray or MLflow are imported: a typo ends in well under a second
    cfg = load_config(args.config, args.overrides)
    from probes.pipeline import train_and_probe

    _quiet_ray()
    out = train_and_probe(cfg, address=args.address)
    print(f"\nrun {out.run_key} finished")
    if out.final:
        print("final probe figures:\n" + format_figures(out.final))
    if out.run_id:
        print(f"MLflow run id: {out.run_id}  (experiment '{cfg.experiment_name}', "
              f"store {_display_uri(out.tracking_uri)})")
        print("browse: make ui  (or: linrep ui) -> http://127.0.0.1:5000")
    print(f"checkpoints: {out.run_dir}")
    return 0


def _display_uri(uri: str | None) -> str:
    from trainer.tracking import redact

    return redact(uri or "")


# ---- probe ---------------------------------------------------------------------------------
def cmd_probe(args) -> int:
    from trainer.config import TrackingConfig
    from trainer.tracking import resolve_uri

    if args.target == "imagenetx":
        from linrep.imagenetx_cli import cli_main

        return cli_main(args.rest)
    if args.rest:
        raise UserError(f"unexpected arguments after the run id: {' '.join(args.rest)}")
    if "/" in args.target or Path(args.target).exists():  # a checkpoint folder or URI: probe it, print
        from probes.actor import probe_checkpoint

        step, figures = probe_checkpoint(args.target)  # a local folder or a URI
        print(f"checkpoint {args.target} (step {step}):\n" + format_figures(figures))
        return 0
    check_run_id(args.target)
    check_store_exists(args.target, args.tracking_uri)  # before MLflow (and torch) are imported
    from probes.pipeline import reprobe_run

    uri = resolve_uri(TrackingConfig(uri=args.tracking_uri))
    reprobe_run(args.target, uri, log=not args.no_log)
    return 0


RUN_ID = re.compile(r"[0-9a-f]{32}")
"""MLflow run ids: 32 lowercase hex digits (a uuid4 without dashes), in every store."""


def check_run_id(target: str) -> None:
    if not RUN_ID.fullmatch(target):
        raise UserError(f"'{target}' is neither a checkpoint folder nor an MLflow run id (32 hex digits, "
                        "as printed by linrep train)")


def check_store_exists(run_id: str, tracking_uri: str | None) -> None:
    """A sqlite store that does not exist holds no run: say so instead of creating an empty one."""
    from trainer.tracking import DEFAULT_DIR

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DIR / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_file():
            raise UserError(f"MLflow run {run_id} not found: no tracking store at {path} "
                            "(pass --tracking-uri or set MLFLOW_TRACKING_URI)")


# ---- ui ------------------------------------------------------------------------------------
def cmd_ui(args) -> int:
    from trainer.config import TrackingConfig
    from trainer.tracking import artifact_root, resolve_uri

    uri = resolve_uri(TrackingConfig(uri=args.tracking_uri))
    cmd = [sys.executable, "-m", "mlflow", "ui", "--host", args.host, "--port", str(args.port),
           "--backend-store-uri", uri]
    root = artifact_root(uri)
    if root:
        cmd += ["--default-artifact-root", root]
    print(f"MLflow UI on http://{args.host}:{args.port} (store {uri}); Ctrl-C to stop", flush=True)
    os.execv(sys.executable, cmd)
    return 0  # pragma: no cover


def cmd_presets(args) -> int:
    from trainer.config import list_presets, load_raw

    for name in list_presets():
        raw = load_raw(name)
        print(f"{name:<28} dataset={raw.get('data', {}).get('dataset', 'synthetic')}")
    return 0


# ---- data ----------------------------------------------------------------------------------
def check_data_args(args) -> None:
    """Counts, before any converter (and its imports) runs."""
    for flag, value in (("--limit", getattr(args, "limit", None)), ("--samples-per-shard", args.samples_per_shard),
                        ("--processes", args.processes)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: must be >= 1")


def make_out_folder(out: Path) -> list[Path]:
    """Create --out (one line when it cannot be); return the folders created, newest last."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    created = [p for p in (out, *out.parents) if not p.exists()][::-1]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {out}: cannot create the output folder ({err.strerror or err})") from None
    return created


def cmd_data(args) -> int:
    check_data_args(args)
    created = make_out_folder(Path(args.out))
    try:
        convert_data(args)
    except BaseException:
        if created:  # bad input writes nothing: drop the folders made for it (only empty ones)
            remove_empty_folders(created[0])
        raise
    print(f"shards and manifest.json written to {args.out}")
    return 0


def remove_empty_folders(top: Path) -> None:
    for folder, _, _ in sorted(os.walk(top), key=lambda entry: -len(entry[0])):  # deepest first
        try:
            os.rmdir(folder)
        except OSError:
            pass  # holds a file: what was written stays


def convert_data(args) -> None:
    if args.kind == "dsprites":
        from trainer.data.convert.dsprites import generate_dsprites

        generate_dsprites(Path(args.out), seed=args.seed, samples_per_shard=args.samples_per_shard,
                          processes=args.processes, limit=args.limit)
    elif args.kind == "convert":
        from trainer.data.convert.dislib import convert

        convert(args.dataset, Path(args.src), Path(args.out), seed=args.seed,
                samples_per_shard=args.samples_per_shard, processes=args.processes)
    elif args.kind == "imagenet":
        from trainer.data.convert.imagenet import convert_imagenet

        convert_imagenet(Path(args.src), Path(args.out), samples_per_shard=args.samples_per_shard,
                         processes=args.processes, classes_from=args.classes_from, seed=args.seed)


# ---- sweep / reproduce / bench (tune/ and bench modules) -----------------------------------
def cmd_sweep(args) -> int:
    from tune.sweep import run_sweep_cli

    _quiet_ray()
    return run_sweep_cli(args)


def cmd_reproduce(args) -> int:
    if args.arm == "imagenetx":
        dislib_only = [flag for flag, value in (("--root", args.root), ("--models", args.models), ("--set", args.set))
                       if value is not None]
        if dislib_only:
            raise UserError(f"{dislib_only[0]}: only for `linrep reproduce dislib`"
                            " (imagenetx takes --shards)")
        from tune.reproduce_imagenetx import reproduce_imagenetx_cli

        return reproduce_imagenetx_cli(args)
    misplaced = [f"--{name.replace('_', '-')}" for name in IMAGENETX_ONLY if getattr(args, name, None) not in (None, False)]
    if misplaced:
        raise UserError(f"{', '.join(misplaced)}: only for `linrep reproduce imagenetx`, not `reproduce {args.arm}`")
    _quiet_ray()
    if args.arm == "dislib":
        from tune.reproduce_dislib import reproduce_dislib_cli

        return reproduce_dislib_cli(args)
    for flag, value in (("--root", args.root), ("--models", args.models), ("--set", args.set)):
        if value is not None:
            raise UserError(f"{flag}: only for `linrep reproduce dislib`, not `reproduce {args.arm}`")
    from tune.reproduce import reproduce_cli

    return reproduce_cli(args)


# arguments of `reproduce imagenetx` that `reproduce synthetic` would otherwise ignore silently
IMAGENETX_ONLY = ("shards", "weights", "checkpoint", "out", "device", "tracking_uri", "no_log")


def cmd_bench(args) -> int:
    from linrep.bench import bench_cli

    _quiet_ray()
    return bench_cli(args)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (exit 2) naming the offending argument."""

    def error(self, message: str):  # noqa: D401 - argparse's API
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="linrep", description=__doc__.split("\n\n")[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)

    t = sub.add_parser("train", help="train a preset or config file through Ray Train, with probes")
    t.add_argument("config", help="preset name (linrep presets) or YAML file")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. data.num_classes=1000")
    t.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    t.set_defaults(func=cmd_train)

    pr = sub.add_parser("probe", help="re-probe every checkpoint of a run, one checkpoint, or `probe imagenetx ...`")
    pr.add_argument("target", help="an MLflow run id, a checkpoint folder, or 'imagenetx'")
    pr.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of `probe imagenetx` (see --help there)")
    pr.add_argument("--tracking-uri", default=None)
    pr.add_argument("--no-log", action="store_true", help="print only, do not log to MLflow")
    pr.set_defaults(func=cmd_probe)

    u = sub.add_parser("ui", help="open the MLflow UI on 127.0.0.1")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--tracking-uri", default=None)
    u.set_defaults(func=cmd_ui)

    sub.add_parser("presets", help="list presets").set_defaults(func=cmd_presets)

    d = sub.add_parser("data", help="write WebDataset shards + manifest.json")
    dsub = d.add_subparsers(dest="kind", required=True, parser_class=OneLineParser)
    ds = dsub.add_parser("dsprites", help="render the full dSprites grid procedurally")
    ds.add_argument("--limit", type=int, default=None, help="a seeded random subset of N grid images")
    dc = dsub.add_parser("convert", help="convert official DisLib files")
    dc.add_argument("dataset", choices=["dsprites", "shapes3d", "mpi3d", "cars3d", "smallnorb"])
    dc.add_argument("src", help="the official file or folder")
    di = dsub.add_parser("imagenet", help="convert an ImageNet folder tree")
    di.add_argument("src")
    di.add_argument("--classes-from", default="standard", choices=["standard", "train"],
                    help="class order: the standard 1000 wnids, or the sorted train/ folders (small trees)")
    for q in (ds, dc, di):
        q.add_argument("--out", required=True, help="output folder for shards + manifest.json")
        q.add_argument("--seed", type=int, default=0,
                       help="seed of the 80/10/10 split (ImageNet: of the train order; val stays val)")
        q.add_argument("--samples-per-shard", type=int, default=10000 if q is not di else 1000)
        q.add_argument("--processes", type=int, default=2)
    d.set_defaults(func=cmd_data)

    sw = sub.add_parser("sweep", help="Ray Tune sweep from a spec (tune/specs or a file)")
    sw.add_argument("spec")
    sw.add_argument("overrides", nargs="*", help="key=value overrides of the base config")
    sw.add_argument("--address", default=None)
    sw.add_argument("--name", default=None, help="sweep name (default: from the spec; reruns resume)")
    sw.add_argument("--storage", default=None, help="where sweep folders live: a local folder or a URI such as s3://bucket/linrep/sweeps (default: <run.storage or $LINREP_STORAGE>/sweeps)")
    sw.set_defaults(func=cmd_sweep)

    rp = sub.add_parser("reproduce", help="the paper's experiments: synthetic ablations, DisLib table, ImageNet-X")
    rp.add_argument("arm", choices=["synthetic", "dislib", "imagenetx"],
                    help="synthetic ablations, the DisLib table (section 4.2), or ImageNet-X (figure 3)")
    rp.add_argument("--quick", action="store_true", help="the CI-sized grid")
    rp.add_argument("--budget", type=float, default=1.0, help="scale the step budget (e.g. 10 on a cluster)")
    rp.add_argument("--seeds", type=int, default=None,
                    help="seeds per setting (default: synthetic 5, dislib 3, imagenetx 10; --quick fewer)")
    rp.add_argument("--plan", action="store_true", help="print every trial (arm or dataset, model, overrides, steps) and run nothing")
    rp.add_argument("--root", default=None,
                    help="dislib: folder with one shards folder per dataset (dsprites, shapes3d, mpi3d, cars3d, "
                         "smallnorb; dSprites rendered there when missing). Default ./data")
    rp.add_argument("--models", default=None, metavar="mlp,cnn",
                    help="dislib: the table's columns to run (default both; mlp alone on a CPU machine)")
    rp.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="dislib, repeatable: a config override for every trial, e.g. run.use_gpu=true")
    rp.add_argument("--address", default=None)
    rp.add_argument("--storage", default=None, help="where sweep folders live: a local folder or a URI such as s3://bucket/linrep/sweeps (default: <run.storage or $LINREP_STORAGE>/sweeps)")
    from tune.reproduce_imagenetx import add_imagenetx_arguments  # argparse only: no torch at --help

    add_imagenetx_arguments(rp)
    rp.set_defaults(func=cmd_reproduce)

    for q in (t, sw, rp):  # Ray's and libraries' messages go to the run's log file unless --verbose
        q.add_argument("--verbose", action="store_true", help="also show Ray's and libraries' messages")

    b = sub.add_parser("bench", help="benchmarks (identifiability, overhead, streaming, scaling, probes, sweep)")
    b.add_argument("names", nargs="*")
    b.add_argument("--out", default="results/bench", help="folder for the JSON results")
    b.add_argument("--quick", action="store_true", help="smaller sizes (smoke test)")
    b.add_argument("--no-mlflow", action="store_true")
    b.set_defaults(func=cmd_bench)

    try:
        from linrep.submit import add_jobs_parser, add_submit_parser

        add_submit_parser(sub)
        add_jobs_parser(sub)
    except ImportError:
        pass
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "verbose", False):
        os.environ["LINREP_VERBOSE"] = "1"  # read by trainer/progress.py
    try:
        return int(args.func(args) or 0)
    except (UserError, RuntimeFault) as err:
        if args.debug:
            raise
        from trainer.tracking import scrub_env_secrets

        print(f"linrep: error: {scrub_env_secrets(str(err))}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("linrep: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # last resort: one line, the traceback only with --debug
        if args.debug:
            raise
        from trainer.tracking import scrub_env_secrets

        msg = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        print(f"linrep: internal error: {err.__class__.__name__}: {scrub_env_secrets(msg)} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
