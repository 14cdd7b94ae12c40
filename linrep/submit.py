"""`linrep submit` and `linrep jobs`: run linrep commands on a Ray cluster through the Ray Jobs API.

    linrep submit [options] COMMAND ...     package the working dir, submit `linrep COMMAND ...`,
                                            print the job id, follow its logs (unless --no-wait)
    linrep jobs list|status|logs|stop       look after submitted jobs

The working directory travels as the job's runtime_env `working_dir` (Ray respects .gitignore and
.rayignore; data, stores, results and virtualenvs are always excluded), so the cluster runs the
code as it is here. The job gets `LINREP_RAY_JOB_ID=<submission id>` (the id is chosen here, so it
is known before submission; trainer.tracking tags the MLflow run with it) and MLFLOW_TRACKING_URI.

Where the cluster is: --address, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS when it is an
http(s) URL, else http://127.0.0.1:8265 (infra/local/cluster.sh). Its token (Ray token auth):
--token-file, else $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, the local cluster's
$LINREP_CLUSTER_DIR/auth_token (loopback addresses only), ~/.ray/auth_token.
Every problem with the address, the token or the upload is one line (UserError); a job that
fails is one line too (RuntimeFault, exit 1), after its logs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import secrets
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, TextIO
from urllib.parse import urlparse

from trainer import ray_private
from trainer.errors import RuntimeFault, UserError

if TYPE_CHECKING:  # ray is imported lazily: `linrep --help` must stay fast
    from ray.job_submission import JobSubmissionClient

SUBMITTABLE = ("train", "sweep", "probe", "reproduce", "data", "bench")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
JOB_ID_ENV = "LINREP_RAY_JOB_ID"
GIT_COMMIT_ENV = "LINREP_GIT_COMMIT"  # .git does not travel; tracking can tag the run with this
# Anchored (leading /) so that e.g. trainer/data/ (a package) is not caught by /data/.
ALWAYS_EXCLUDE = ("/.git/", "/.venv/", "/venv/", "/data/", "/mlruns/", "/ray_results/", "/results/",
                  "/.linrep-cluster/", "__pycache__/", "*.pyc", ".pytest_cache/")
UPLOAD_LIMIT_BYTES = 90 * 2**20  # the dashboard accepts 100 MiB; leave headroom for the zip
PROBE_TIMEOUT_S = 10.0
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
CLUSTER_TRACKING = "cluster"  # --tracking-uri cluster: use the nodes' own MLFLOW_TRACKING_URI


# ---- where the cluster is, and how to authenticate -----------------------------------------
@dataclass(frozen=True)
class ClusterTarget:
    """The Jobs API to talk to: its URL, the request headers (token), and where both came from."""

    address: str
    address_source: str
    headers: dict[str, str] = field(default_factory=dict, hash=False)
    token_source: str | None = None

    @property
    def is_local(self) -> bool:
        """The head runs on this machine (same filesystem, same interpreter paths)."""
        return (urlparse(self.address).hostname or "") in LOOPBACK_HOSTS


def resolve_address(cli_value: str | None, env: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """The Jobs API URL and a phrase naming where it came from."""
    if cli_value:
        value, source = cli_value, "--address"
    elif env.get("RAY_API_SERVER_ADDRESS"):
        value, source = env["RAY_API_SERVER_ADDRESS"], "RAY_API_SERVER_ADDRESS"
    elif env.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        value, source = env["RAY_ADDRESS"], "RAY_ADDRESS"
    else:
        return DEFAULT_ADDRESS, "the default"
    return normalise_address(value, source), source


def normalise_address(value: str, source: str) -> str:
    """'host:8265' -> 'http://host:8265'; a Ray Client or GCS address is a clear error."""
    value = value.strip().rstrip("/")
    if value.startswith("ray://") or value == "auto":
        raise UserError(f"{source}={value} is not a Jobs API address: pass the head's dashboard URL, "
                        "e.g. --address http://<head>:8265")
    if "://" not in value:
        value = f"http://{value}"
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UserError(f"{source}={value} is not an http(s) URL of a Ray dashboard (http://<head>:8265)")
    try:
        parsed.port
    except ValueError:
        raise UserError(f"{source}={value} has an invalid port") from None
    return value


def find_token(token_file: str | None, address_is_local: bool,
               env: Mapping[str, str] = os.environ) -> tuple[str | None, str | None]:
    """(token, where it came from), or (None, None) when no token is configured anywhere."""
    if token_file:
        return _read_token(Path(token_file).expanduser(), "--token-file"), "--token-file"
    if env.get("RAY_AUTH_TOKEN"):
        return env["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    if env.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser()
        return _read_token(path, "RAY_AUTH_TOKEN_PATH"), f"RAY_AUTH_TOKEN_PATH ({path})"
    candidates = []
    if address_is_local:  # infra/local/cluster.sh's token, only ever sent to this machine
        candidates.append(Path(env.get("LINREP_CLUSTER_DIR", ".linrep-cluster")) / "auth_token")
    candidates.append(Path.home() / ".ray" / "auth_token")
    for path in candidates:
        if path.is_file():
            return _read_token(path, str(path)), str(path)
    return None, None


def _read_token(path: Path, source: str) -> str:
    try:
        token = path.read_text().strip()
    except OSError as err:
        raise UserError(f"token file {path} ({source}) cannot be read: {err.strerror or err}") from None
    if not token:
        raise UserError(f"token file {path} ({source}) is empty")
    return token


def target_from_args(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> ClusterTarget:
    address, source = resolve_address(getattr(args, "address", None), env)
    is_local = (urlparse(address).hostname or "") in LOOPBACK_HOSTS
    token, token_source = find_token(getattr(args, "token_file", None), is_local, env)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return ClusterTarget(address, source, headers, token_source)


def probe_jobs_api(target: ClusterTarget, env: Mapping[str, str] = os.environ,
                   timeout: float = PROBE_TIMEOUT_S) -> str:
    """Ask the Jobs API for its Ray version; every way this can fail becomes one UserError line."""
    import requests

    where = f"the Ray Jobs API at {target.address} ({target.address_source})"
    try:
        resp = requests.get(f"{target.address}/api/version", headers=target.headers, timeout=timeout)
    except requests.exceptions.Timeout:
        raise UserError(f"cannot reach {where}: no answer within {timeout:.0f} s") from None
    except requests.exceptions.RequestException as err:
        raise UserError(f"cannot reach {where}: {_connection_reason(err)}{_address_hint(target, env)}") from None
    if resp.status_code == 401:
        raise UserError(f"{where} needs a token: pass --token-file FILE or set RAY_AUTH_TOKEN_PATH "
                        "(local cluster: source .linrep-cluster/env)")
    if resp.status_code == 403:
        raise UserError(f"{where} rejected the token from {target.token_source}")
    try:
        version = resp.json()["ray_version"] if resp.status_code == 200 else None
    except (ValueError, KeyError, TypeError):
        version = None
    if not version:
        raise UserError(f"{target.address} ({target.address_source}) answered HTTP {resp.status_code} but is "
                        "not a Ray dashboard: pass the head's dashboard URL (port 8265 by default)")
    return str(version)


def _connection_reason(err: Exception) -> str:
    text = str(err)
    for needle, reason in (("Connection refused", "connection refused"),
                           ("Name or service not known", "unknown host"),
                           ("Temporary failure in name resolution", "unknown host"),
                           ("No route to host", "no route to host"),
                           ("Network is unreachable", "network unreachable")):
        if needle in text:
            return reason
    return err.__class__.__name__


def _address_hint(target: ClusterTarget, env: Mapping[str, str]) -> str:
    if target.address_source == "the default":
        gcs = env.get("RAY_ADDRESS")
        extra = f"; RAY_ADDRESS={gcs} is not a Jobs API URL" if gcs else ""
        return f" (start one with infra/local/cluster.sh up, or pass --address http://<head>:8265{extra})"
    return ""


def connect(args: argparse.Namespace) -> tuple["JobSubmissionClient", ClusterTarget]:
    """A JobSubmissionClient for the cluster named by args/env, after a probe that fails in one line."""
    target = target_from_args(args)
    version = probe_jobs_api(target)
    import ray
    from ray.job_submission import JobSubmissionClient

    if version != ray.__version__:
        _note(f"warning: the cluster runs Ray {version}, this machine {ray.__version__}")
    for name in ("ray.dashboard.modules.dashboard_sdk", ray_private.PACKAGING_LOGGER,
                 "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)  # our own summary replaces their INFO lines
    try:
        client = JobSubmissionClient(target.address, headers=dict(target.headers))
    except (ConnectionError, RuntimeError) as err:
        raise UserError(f"cannot use the Ray Jobs API at {target.address}: {_first_line(err)}") from None
    return client, target


# ---- what runs: the entrypoint and its runtime_env -----------------------------------------
def new_submission_id(seed: int | None = None, now: float | None = None) -> str:
    """linrep-<YYYYmmdd-HHMMSS>-<6 hex>: sortable, unique, known before submission.
    `seed` makes the suffix reproducible (tests); None draws it from the OS."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))
    suffix = secrets.token_hex(3) if seed is None else f"{random.Random(seed).getrandbits(24):06x}"
    return f"linrep-{stamp}-{suffix}"


def check_command(command: list[str]) -> list[str]:
    """The linrep command to run: drop a leading '--', and only commands that make sense on a cluster."""
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise UserError(f"nothing to submit: name a linrep command ({' | '.join(SUBMITTABLE)}), "
                        "e.g. linrep submit train synthetic-supervised")
    if command[0] not in SUBMITTABLE:
        raise UserError(f"'{command[0]}' cannot be submitted: choose one of {', '.join(SUBMITTABLE)}")
    return command


def build_entrypoint(command: list[str], python: str, is_local: bool) -> str:
    """The job's shell command. The job runs with the head's PATH, so on this machine we name our
    own interpreter by absolute path; elsewhere `linrep` from the cluster image's PATH."""
    if python == "auto":
        launcher = [sys.executable, "-m", "linrep"] if is_local else ["linrep"]
    elif python == "linrep":
        launcher = ["linrep"]
    else:
        launcher = [python, "-m", "linrep"]
    return shlex.join(launcher + command)


def job_tracking_uri(value: str | None, explicit: bool, is_local: bool) -> tuple[str | None, str | None]:
    """(MLFLOW_TRACKING_URI to give the job or None, a note for the user or None).

    A URI that names this machine (loopback host, local file) means nothing on a remote cluster:
    taken from the environment it is not passed (the nodes' own MLFLOW_TRACKING_URI applies); given
    explicitly it is an error. Relative sqlite/file paths are made absolute (the job's cwd is a
    temporary copy of the working dir, whose store would vanish with it)."""
    if not value or value == CLUSTER_TRACKING:
        return None, None
    parsed = urlparse(value)
    is_file = parsed.scheme in ("", "file", "sqlite")
    names_this_machine = is_file or (parsed.hostname or "") in LOOPBACK_HOSTS
    if names_this_machine and not is_local:
        if explicit:
            raise UserError(f"--tracking-uri {value} names this machine, which the cluster cannot reach: pass "
                            f"a server the cluster can reach, or --tracking-uri {CLUSTER_TRACKING}")
        return None, (f"note: MLFLOW_TRACKING_URI={value} names this machine: not passed to the job "
                      "(it logs to the cluster's own MLFLOW_TRACKING_URI)")
    if parsed.scheme == "sqlite" and value.startswith("sqlite:///") and not value.startswith("sqlite:////"):
        return f"sqlite:///{Path(value[len('sqlite:///'):]).resolve()}", None
    if parsed.scheme == "":
        return str(Path(value).resolve()), None
    return value, None


def local_git_commit(working_dir: Path) -> str | None:
    """HEAD of the working dir's git checkout, '+dirty' when tracked files differ; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=working_dir, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=working_dir,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def prevalidate(command: list[str], working_dir: Path) -> None:
    """`train`: load and check its config here, so a config error costs no cluster round trip (the
    job would run the same code on the same files). Other commands check themselves on the cluster."""
    if command[0] != "train" or len(command) < 2 or command[1].startswith("-"):
        return
    if Path.cwd().resolve() != working_dir:
        return  # relative config paths are resolved in the job's cwd, the working dir
    from trainer.config import load_config

    load_config(command[1], [a for a in command[2:] if "=" in a and not a.startswith("-")])


def parse_env_items(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not key.replace("_", "").isalnum():
            raise UserError(f"--env {item}: expected KEY=VALUE")
        out[key] = value
    return out


def build_runtime_env(working_dir: Path, excludes: list[str], env_vars: dict[str, str]) -> dict[str, Any]:
    return {"working_dir": str(working_dir), "excludes": list(excludes), "env_vars": dict(env_vars)}


def job_excludes(working_dir: Path, extra: list[str], env: Mapping[str, str] = os.environ) -> list[str]:
    """ALWAYS_EXCLUDE + the local cluster's state dir when it lives inside the working dir + --exclude."""
    excludes = list(ALWAYS_EXCLUDE)
    state = Path(env.get("LINREP_CLUSTER_DIR", ".linrep-cluster")).resolve()
    try:
        rel = state.relative_to(working_dir.resolve())
        if str(rel) != ".":
            excludes.append(f"/{rel.as_posix()}/")
    except ValueError:
        pass
    return excludes + list(extra)


# ---- what travels: Ray's own packaging rules, applied here to check before uploading ----------
def upload_listing(working_dir: Path, excludes: list[str]) -> list[Path]:
    """The files Ray will upload for runtime_env {"working_dir": working_dir, "excludes": excludes}:
    Ray's default excludes, .gitignore (unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1), .rayignore."""
    root = working_dir.resolve()
    rules = ray_private.runtime_env_default_excludes() + list(excludes)
    files: list[Path] = []
    quiet = logging.getLogger("linrep.submit.listing")
    quiet.setLevel(logging.WARNING)
    ray_private.walk_working_dir(root, rules, lambda p: p.is_file() and files.append(p),
                                 include_gitignore=ray_private.working_dir_includes_gitignore(), logger=quiet)
    return sorted(files)


def check_package_sources(working_dir: Path, listing: list[Path]) -> None:
    """Every .py file of the top-level Python packages in the working dir must travel; a .gitignore
    rule such as 'data/' (which also matches trainer/data/) would otherwise break the job on import."""
    root = working_dir.resolve()
    uploaded = set(listing)
    for pkg in sorted(p.parent for p in root.glob("*/__init__.py")):
        for src in sorted(pkg.rglob("*.py")):
            if "__pycache__" in src.parts or src in uploaded:
                continue
            rel = src.relative_to(root).as_posix()
            rule = _gitignore_rule(root, rel)
            why = f".gitignore rule '{rule}' matches it; anchor the rule (e.g. '/{rule.lstrip('/')}')" if rule \
                else "an exclude rule or .rayignore matches it"
            raise UserError(f"{rel} would not be uploaded with the job: {why}")


def _gitignore_rule(root: Path, rel: str) -> str | None:
    from pathspec import GitIgnoreSpec

    gitignore = root / ".gitignore"
    if not gitignore.is_file():
        return None
    for line in gitignore.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and GitIgnoreSpec.from_lines([line]).match_file(rel):
            return line
    return None


def check_path_arguments(command: list[str], working_dir: Path, listing: list[Path], is_local: bool) -> None:
    """Config files named on the command line must exist on the cluster: inside the upload, or (on
    this machine's own head) anywhere by absolute path."""
    root = working_dir.resolve()
    uploaded = set(listing)
    for arg in command[1:]:
        if arg.startswith("-") or "=" in arg or not arg.endswith((".yaml", ".yml", ".json")):
            continue
        path = Path(arg) if Path(arg).is_absolute() else root / arg
        if not path.is_file():
            continue
        inside = path.resolve().is_relative_to(root)
        if inside and path.resolve() not in uploaded:
            raise UserError(f"{arg} is excluded from the upload (.gitignore, .rayignore or --exclude): "
                            "the job would not find it")
        if not inside and not is_local:
            raise UserError(f"{arg} is outside the working dir {root}: it would not exist on the cluster "
                            "(move it into the working dir and pass a relative path)")


def describe_listing(listing: list[Path]) -> tuple[int, int]:
    return len(listing), sum(p.stat().st_size for p in listing)


# ---- following a job -----------------------------------------------------------------------
def wait_for_start(client: "JobSubmissionClient", job_id: str, poll_s: float = 0.25) -> Any:
    """Poll until the job leaves PENDING (runtime_env set-up); returns its status."""
    from ray.job_submission import JobStatus

    while True:
        status = client.get_job_status(job_id)
        if status != JobStatus.PENDING:
            return status
        time.sleep(poll_s)


def stream_logs(client: "JobSubmissionClient", job_id: str, out: TextIO) -> None:
    """Print the job's logs as they come, until it ends. If the log stream breaks, fall back to
    polling and print whatever was not shown yet."""
    shown = 0

    async def tail() -> None:
        nonlocal shown
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()
            shown += len(chunk)

    try:
        asyncio.run(tail())
    except (RuntimeError, OSError) as err:
        _note(f"log stream interrupted ({_first_line(err)}); polling instead")
        while not client.get_job_status(job_id).is_terminal():
            time.sleep(1.0)
        out.write(client.get_job_logs(job_id)[shown:])
        out.flush()


def final_outcome(client: "JobSubmissionClient", job_id: str, elapsed_s: float) -> int:
    """0 for SUCCEEDED; otherwise a RuntimeFault whose one line carries the job's own error."""
    from ray.job_submission import JobStatus

    info = client.get_job_info(job_id)
    if info.status == JobStatus.SUCCEEDED:
        _note(f"job {job_id} SUCCEEDED after {elapsed_s:.1f} s")
        return 0
    code = f" (exit code {info.driver_exit_code})" if info.driver_exit_code not in (None, 0) else ""
    raise RuntimeFault(f"job {job_id} {info.status}{code}: {job_error_line(client, job_id, info.message)}")


def job_error_line(client: "JobSubmissionClient", job_id: str, message: str | None) -> str:
    """The most telling line: the job's last error line (e.g. linrep's own 'linrep: error: ...'),
    else Ray's status message."""
    try:
        logs = client.get_job_logs(job_id)
    except RuntimeError:
        logs = ""
    for line in reversed(logs.strip().splitlines()):
        line = line.strip()
        if line.startswith("linrep: "):
            return line.removeprefix("linrep: ").removeprefix("error: ")[:300]
        if "Error" in line.split(":", 1)[0]:
            return line[:300]
    return _first_line(message or "no message")


# ---- the commands --------------------------------------------------------------------------
def run_submit(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    command = check_command(list(args.command))
    working_dir = Path(args.working_dir).expanduser().resolve()
    if not working_dir.is_dir():
        raise UserError(f"--working-dir {args.working_dir} is not a directory")
    prevalidate(command, working_dir)
    client, target = connect(args)

    excludes = job_excludes(working_dir, args.exclude)
    listing = upload_listing(working_dir, excludes)
    check_package_sources(working_dir, listing)
    check_path_arguments(command, working_dir, listing, target.is_local)
    files, size = describe_listing(listing)
    if size > UPLOAD_LIMIT_BYTES:
        raise UserError(f"the upload of {working_dir} would be {size / 2**20:.0f} MiB (limit "
                        f"{UPLOAD_LIMIT_BYTES // 2**20} MiB): exclude large files with --exclude or .rayignore")

    job_id = args.submission_id or new_submission_id()
    env_vars = parse_env_items(args.env)
    env_vars[JOB_ID_ENV] = job_id
    commit = local_git_commit(working_dir)
    if commit:
        env_vars.setdefault(GIT_COMMIT_ENV, commit)
    explicit = args.tracking_uri is not None
    uri, note = job_tracking_uri(args.tracking_uri if explicit else os.environ.get("MLFLOW_TRACKING_URI"),
                                 explicit, target.is_local)
    if note:
        _note(note)
    if uri:
        env_vars["MLFLOW_TRACKING_URI"] = uri
    entrypoint = build_entrypoint(command, args.python, target.is_local)

    _note(f"packaging {working_dir}: {files} files, {size / 1024:.0f} KiB; submitting to {target.address}")
    try:
        client.submit_job(entrypoint=entrypoint, submission_id=job_id,
                          runtime_env=build_runtime_env(working_dir, excludes, env_vars),
                          entrypoint_num_cpus=args.num_cpus, entrypoint_num_gpus=args.num_gpus)
    except (RuntimeError, ValueError) as err:
        raise UserError(f"the cluster refused job {job_id}: {_first_line(err)}") from None
    print(job_id, flush=True)
    if args.no_wait:
        _note(f"follow: linrep jobs logs {job_id} --follow   stop: linrep jobs stop {job_id}")
        return 0

    try:
        status = wait_for_start(client, job_id)
        _note(f"job {job_id} {status} {time.monotonic() - t0:.1f} s after `linrep submit` started")
        stream_logs(client, job_id, sys.stdout)
    except KeyboardInterrupt:
        _note(f"stopped following {job_id}; it keeps running (linrep jobs logs {job_id} --follow, "
              f"linrep jobs stop {job_id})")
        return 130
    return final_outcome(client, job_id, time.monotonic() - t0)


def run_jobs(args: argparse.Namespace) -> int:
    client, _ = connect(args)
    action: Callable[[Any, argparse.Namespace], int] = _JOB_ACTIONS[args.action]
    return action(client, args)


def _jobs_list(client: "JobSubmissionClient", args: argparse.Namespace) -> int:
    jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    if not jobs:
        print("no jobs")
        return 0
    print(f"{'SUBMISSION ID':<32} {'STATUS':<10} {'STARTED':<19} {'DURATION':>9}  ENTRYPOINT")
    for job in jobs:
        print(f"{(job.submission_id or job.job_id or '-'):<32} {str(job.status):<10} "
              f"{_clock(job.start_time):<19} {_duration(job.start_time, job.end_time):>9}  "
              f"{_short(job.entrypoint or '', 60)}")
    return 0


def _jobs_status(client: "JobSubmissionClient", args: argparse.Namespace) -> int:
    info = _job_info(client, args.job_id)
    print(f"job:        {args.job_id}")
    print(f"status:     {info.status}")
    print(f"entrypoint: {info.entrypoint}")
    print(f"started:    {_clock(info.start_time)}   duration: {_duration(info.start_time, info.end_time)}")
    if info.message:
        print(f"message:    {_first_line(info.message)}")
    return 0


def _jobs_logs(client: "JobSubmissionClient", args: argparse.Namespace) -> int:
    _job_info(client, args.job_id)  # unknown id -> one line
    if args.follow:
        try:
            stream_logs(client, args.job_id, sys.stdout)
        except KeyboardInterrupt:
            return 130
    else:
        sys.stdout.write(client.get_job_logs(args.job_id))
    return 0


def _jobs_stop(client: "JobSubmissionClient", args: argparse.Namespace) -> int:
    _job_info(client, args.job_id)
    stopped = client.stop_job(args.job_id)
    if not stopped:
        print(f"job {args.job_id} had already ended ({client.get_job_status(args.job_id)})")
        return 0
    print(f"stop requested for job {args.job_id}")
    if args.wait:
        while not (status := client.get_job_status(args.job_id)).is_terminal():
            time.sleep(0.5)
        print(f"job {args.job_id} {status}")
    return 0


_JOB_ACTIONS = {"list": _jobs_list, "status": _jobs_status, "logs": _jobs_logs, "stop": _jobs_stop}


def _job_info(client: "JobSubmissionClient", job_id: str) -> Any:
    try:
        return client.get_job_info(job_id)
    except RuntimeError as err:
        if "404" in str(err) or "does not exist" in str(err):
            raise UserError(f"no job '{job_id}' on this cluster (linrep jobs list shows them)") from None
        raise


# ---- argparse ------------------------------------------------------------------------------
def _connection_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", default=None,
                        help="Ray dashboard / Jobs API URL, e.g. http://<head>:8265 (default: "
                             "$RAY_API_SERVER_ADDRESS, an http $RAY_ADDRESS, or http://127.0.0.1:8265)")
    common.add_argument("--token-file", default=None,
                        help="file with the cluster's Ray auth token (default: $RAY_AUTH_TOKEN, "
                             "$RAY_AUTH_TOKEN_PATH, the local cluster's, ~/.ray/auth_token)")
    return common


def add_submit_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "submit", parents=[_connection_options()], help="run a linrep command on a Ray cluster (Jobs API)",
        description="Package the working directory and run `linrep COMMAND ...` as a Ray job; print the "
                    "job id and follow its logs. Example: linrep submit train synthetic-supervised optim.steps=300")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    p.add_argument("--python", default="auto",
                   help="how the cluster starts linrep: auto (this interpreter when the head is on this "
                        "machine, else `linrep` on the head's PATH), linrep, or an interpreter path")
    p.add_argument("--working-dir", default=".", help="folder to upload as the job's working dir (default: .)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="extra .gitignore-style pattern to leave out of the upload (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job (repeatable)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLFLOW_TRACKING_URI for the job (default: $MLFLOW_TRACKING_URI; "
                        f"'{CLUSTER_TRACKING}' = the cluster nodes' own)")
    p.add_argument("--submission-id", default=None, help="job id (default: linrep-<time>-<random>)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs reserved for the job's driver (default 0)")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs reserved for the job's driver (default 0)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND ...",
                   help=f"the linrep command and its arguments ({' | '.join(SUBMITTABLE)})")
    p.set_defaults(func=run_submit)
    return p


def add_jobs_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("jobs", help="list, inspect, follow or stop Ray jobs")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    common = _connection_options()
    sub.add_parser("list", parents=[common], help="all jobs of the cluster, oldest first")
    for name, text in (("status", "a job's status and message"), ("logs", "a job's logs"),
                       ("stop", "stop a running job")):
        q = sub.add_parser(name, parents=[common], help=text)
        q.add_argument("job_id", help="the submission id printed by linrep submit")
        if name == "logs":
            q.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
        if name == "stop":
            q.add_argument("--wait", action="store_true", help="wait until the job has stopped")
    p.set_defaults(func=run_jobs)
    return p


# ---- small helpers -------------------------------------------------------------------------
def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _first_line(err: object) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else err.__class__.__name__)[:300]


def _clock(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _duration(start_ms: int | None, end_ms: int | None) -> str:
    if not start_ms:
        return "-"
    seconds = int(((end_ms or time.time() * 1000) - start_ms) / 1000)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
