"""Errors that reach the user as one line (the CLI prints them and exits 2, or 1 for faults)."""


class UserError(ValueError):
    """Bad input (config, file, shard, checkpoint, address): exit status 2, one line."""

    exit_code = 2


class RuntimeFault(RuntimeError):
    """A fault while running (corrupt data met mid-run, a job that failed): exit status 1."""

    exit_code = 1
