"""Resolve a linrep command line as far as the real CLI does before Ray starts, without running it.

`resolve_command(argv)` parses `argv` with the CLI's own parser and then calls the same functions
the command calls before `ray.init`: a train's config (presets, overrides, cross-field checks), a
sweep's spec and plan (every trial's config), reproduce's plan; `submit` resolves the command it
would submit. tests/test_cluster_paths.py runs it over every `linrep ...` command the shipped
cluster definitions and docs contain, so a documented command that the CLI refuses fails there.
"""

from __future__ import annotations


def resolve_command(argv: list[str]) -> str:
    """One line describing what `linrep ARGV` would run; UserError (or SystemExit(2) from the
    parser) when the CLI would refuse it."""
    from linrep.cli import build_parser

    args = build_parser().parse_args(argv)
    # the subcommand is the first word: submit's own `command` argument shadows args.command
    command = next(a for a in argv if not a.startswith("-"))
    if command == "train":
        from trainer.config import load_config

        cfg = load_config(args.config, args.overrides)
        return f"train {cfg.run_name()}: {cfg.run.workers} workers, use_gpu={cfg.run.use_gpu}"
    if command == "sweep":
        from tune.spec import build_plan, load_spec

        spec, text, path = load_spec(args.spec, name=args.name)
        kwargs = {"storage": args.storage} if getattr(args, "storage", None) else {}
        plan = build_plan(spec, spec_text=text, where=str(path), cli_overrides=list(args.overrides or []), **kwargs)
        return f"sweep {plan.name}: {len(plan.trials)} trials"
    if command == "reproduce" and args.arm == "imagenetx":
        return "reproduce imagenetx: arguments accepted"  # its inputs are checked when it starts, before any work
    if command == "reproduce":
        from tune.reproduce import build_reproduce_plan

        kwargs = {"storage": args.storage} if getattr(args, "storage", None) else {}
        plan = build_reproduce_plan(quick=bool(args.quick), budget=float(args.budget), seeds=args.seeds, **kwargs)
        return f"reproduce {plan.name}: {len(plan.trials)} trials"
    if command == "submit":
        from linrep.submit import check_command

        return "submit " + resolve_command(check_command(list(args.command)))  # train | sweep | ...
    return f"{command}: arguments accepted"
