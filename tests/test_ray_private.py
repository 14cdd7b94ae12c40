"""The private Ray APIs of trainer/ray_private.py still exist and still look as the project uses them.

A Ray upgrade that moves or changes one of them fails here, naming it, rather than in the middle
of a sweep or a job submission. No Ray runtime is started: these are checks of Ray's code.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from pathlib import Path

import pytest

from trainer import ray_private

UPGRADE_HINT = (f"(trainer/ray_private.py was checked against Ray {ray_private.RAY_VERSION_CHECKED}: "
                "fix it there for this Ray, then update RAY_VERSION_CHECKED)")


def _fail(what: str) -> None:
    pytest.fail(f"Ray private API changed: {what} {UPGRADE_HINT}", pytrace=False)


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _need_params(fn, name: str, expected: list[str]) -> None:
    params = _params(fn)
    if params[:len(expected)] != expected:
        _fail(f"{name} takes {params}, expected {expected} first")


def test_ray_is_the_checked_version():
    import ray

    if ray.__version__ != ray_private.RAY_VERSION_CHECKED:
        _fail(f"Ray is {ray.__version__}: run the rest of tests/test_ray_private.py and recheck each API")


def test_controller_callback_is_a_class_with_after_controller_start():
    try:
        cls = ray_private.controller_callback_class()
    except ImportError as err:
        _fail(f"ray.train.v2._internal.execution.callback.ControllerCallback cannot be imported: {err}")
    if not inspect.isclass(cls):
        _fail(f"ControllerCallback is a {type(cls).__name__}, not a class")
    hook = getattr(cls, "after_controller_start", None)
    if not callable(hook):
        _fail("ControllerCallback has no after_controller_start method")
    _need_params(hook, "ControllerCallback.after_controller_start", ["self", "train_run_context"])
    if inspect.iscoroutinefunction(hook):
        _fail("ControllerCallback.after_controller_start became async")


def test_tune_report_callback_keeps_its_item_queue():
    try:
        from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
    except ImportError as err:
        _fail(f"ray.tune.integration.ray_train no longer has TuneReportCallback / CHECKPOINT_PATH_KEY: {err}")
    assert isinstance(CHECKPOINT_PATH_KEY, str)
    init_source = inspect.getsource(TuneReportCallback.__init__)
    if f"self.{ray_private.TRAINING_ITEM_QUEUE_ATTR}" not in init_source:
        _fail(f"TuneReportCallback.__init__ no longer sets self.{ray_private.TRAINING_ITEM_QUEUE_ATTR}")
    after_report_source = inspect.getsource(TuneReportCallback.after_report)
    if f"self.{ray_private.TRAINING_ITEM_QUEUE_ATTR}.put(" not in after_report_source:
        _fail(f"TuneReportCallback.after_report no longer puts on self.{ray_private.TRAINING_ITEM_QUEUE_ATTR}")
    _need_params(TuneReportCallback.after_report, "TuneReportCallback.after_report",
                 ["self", "run_context", "metrics", "checkpoint"])
    from ray.train._internal.session import _TrainSession

    if not callable(getattr(_TrainSession, "_get_or_create_inter_actor_queue", None)):
        _fail("the Train session no longer creates the inter-actor queue TuneReportCallback puts on")


def test_the_item_queue_takes_a_timeout_and_raises_full():
    from ray.util.queue import Full, Queue

    _need_params(Queue.put, "ray.util.queue.Queue.put", ["self", "item", "block", "timeout"])
    assert issubclass(Full, Exception)


def test_wrap_function_makes_a_trainable_class_with_cleanup():
    from ray.tune import Trainable

    try:
        from ray.tune.trainable.function_trainable import wrap_function
    except ImportError as err:
        _fail(f"ray.tune.trainable.function_trainable.wrap_function cannot be imported: {err}")
    _need_params(wrap_function, "wrap_function", ["train_func"])

    def train_fn(config: dict) -> None:
        return None

    cls = ray_private.function_trainable_class(train_fn)
    if not (inspect.isclass(cls) and issubclass(cls, Trainable)):
        _fail(f"wrap_function returned {cls!r}, not a Trainable subclass")
    if not callable(getattr(cls, "cleanup", None)):
        _fail("the function trainable class has no cleanup method to override")


def test_packaging_helpers_keep_their_signatures():
    try:
        packaging = importlib.import_module(ray_private.PACKAGING_MODULE)
    except ImportError as err:
        _fail(f"{ray_private.PACKAGING_MODULE} cannot be imported: {err}")
    for name, expected in (("_dir_travel", ["path", "excludes", "handler", "include_gitignore", "logger"]),
                           ("_get_excludes", ["path", "excludes"])):
        fn = getattr(packaging, name, None)
        if not callable(fn):
            _fail(f"{ray_private.PACKAGING_MODULE}.{name} is gone")
        _need_params(fn, f"{ray_private.PACKAGING_MODULE}.{name}", expected)
    if not isinstance(getattr(packaging, "default_logger", None), logging.Logger) \
            or packaging.default_logger.name != ray_private.PACKAGING_LOGGER:
        _fail(f"{ray_private.PACKAGING_MODULE} no longer logs to the logger named {ray_private.PACKAGING_LOGGER}")
    from ray._private import ray_constants

    if not isinstance(getattr(ray_constants, "RAY_RUNTIME_ENV_IGNORE_GITIGNORE", None), str):
        _fail("ray._private.ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE is gone")
    if not callable(getattr(ray_constants, "get_runtime_env_default_excludes", None)):
        _fail("ray._private.ray_constants.get_runtime_env_default_excludes is gone")


def test_walk_working_dir_applies_rays_rules(tmp_path: Path, monkeypatch):
    """Ray's own traversal, run on a small tree: default excludes, .gitignore, extra rules."""
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("")
    (tmp_path / "pkg" / "skip.log").write_text("")
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "x.bin").write_text("")
    (tmp_path / ".gitignore").write_text("*.log\n")
    monkeypatch.delenv("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", raising=False)
    rules = ray_private.runtime_env_default_excludes()
    assert ".git" in rules and all(isinstance(r, str) for r in rules)

    def listing(include_gitignore: bool) -> set[str]:
        seen: list[Path] = []
        ray_private.walk_working_dir(tmp_path, rules + ["/big/"], lambda p: p.is_file() and seen.append(p),
                                     include_gitignore=include_gitignore, logger=logging.getLogger("test"))
        return {p.relative_to(tmp_path).as_posix() for p in seen}

    assert listing(True) == {".gitignore", "pkg/a.py"}
    assert listing(False) == {".gitignore", "pkg/a.py", "pkg/skip.log"}
    assert ray_private.working_dir_includes_gitignore({}) is True
    from ray._private import ray_constants

    assert ray_private.working_dir_includes_gitignore({ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE: "1"}) is False


def test_torch_backend_keeps_what_the_bound_rendezvous_overrides():
    """BoundRendezvousTorchBackend subclasses Ray's _TorchBackend and replaces its on_start for
    gloo; it calls Ray's env-var helper and tells Train V1's worker group apart, as Ray does."""
    from ray.train.backend import Backend
    from ray.train.torch import TorchConfig

    try:
        from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
        from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend
    except ImportError as err:
        _fail(f"ray.train.torch.config._TorchBackend / _set_torch_distributed_env_vars or Train V1's "
              f"WorkerGroup cannot be imported: {err}")
    if not (inspect.isclass(_TorchBackend) and issubclass(_TorchBackend, Backend)):
        _fail("ray.train.torch.config._TorchBackend is no longer a ray.train.backend.Backend class")
    if not inspect.isclass(V1WorkerGroup):
        _fail("ray.train._internal.worker_group.WorkerGroup is no longer a class")
    for hook in ("on_start", "on_shutdown", "on_training_start"):
        _need_params(getattr(_TorchBackend, hook), f"_TorchBackend.{hook}", ["self", "worker_group", "backend_config"])
    _need_params(_set_torch_distributed_env_vars, "_set_torch_distributed_env_vars", [])
    on_start = inspect.getsource(_TorchBackend.on_start)
    for step in ("_set_torch_distributed_env_vars", "MASTER_ADDR", "MASTER_PORT", "backend_config.timeout_s"):
        if step not in on_start:
            _fail(f"_TorchBackend.on_start no longer uses {step}: recheck what BoundRendezvousTorchBackend keeps")
    if TorchConfig(backend="gloo").backend_cls is not _TorchBackend:
        _fail("TorchConfig.backend_cls is no longer _TorchBackend")


def test_train_v2_starts_the_backend_from_the_config_and_runs_on_the_group():
    """Train V2 builds the backend from ``backend_config.backend_cls()`` and hands on_start the
    execution group, whose execute / execute_single / execute_single_async the override uses."""
    try:
        from ray.train.v2._internal.callbacks.backend_setup import BackendSetupCallback
        from ray.train.v2._internal.execution.worker_group.execution_group import ExecutionGroup
    except ImportError as err:
        _fail(f"Train V2's BackendSetupCallback / ExecutionGroup cannot be imported: {err}")
    source = inspect.getsource(BackendSetupCallback)
    for call in ("backend_config.backend_cls()", ".on_start(execution_group, self._backend_config)"):
        if call not in source:
            _fail(f"Train V2's BackendSetupCallback no longer calls {call}")
    for name, expected in (("execute", ["self", "fn"]), ("execute_single", ["self", "rank", "fn"]),
                           ("execute_single_async", ["self", "rank", "fn"])):
        _need_params(getattr(ExecutionGroup, name), f"ExecutionGroup.{name}", expected)


def test_bound_rendezvous_config_is_a_torch_config_pickled_by_name():
    """The config Train ships to its controller: a TorchConfig naming the overriding backend, which
    pickle sends by reference (trainer.ray_private.<name>), not by value."""
    import pickle

    from ray import cloudpickle
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    config = ray_private.bound_torch_config("gloo")
    assert isinstance(config, TorchConfig) and config.backend == "gloo" and config.timeout_s > 0
    assert issubclass(config.backend_cls, _TorchBackend)
    assert config.backend_cls is ray_private.BoundRendezvousTorchBackend
    data = cloudpickle.dumps(config)
    assert b"trainer.ray_private" in data and b"BoundRendezvousTorchConfig" in data and len(data) < 1000
    assert pickle.loads(data) == config and type(pickle.loads(data)) is type(config)
    with pytest.raises(AttributeError):
        ray_private.no_such_name  # noqa: B018  (the module __getattr__ builds the two classes only)


def test_the_raylets_messages_to_the_driver_reach_the_worker_output_handler(monkeypatch):
    """Ray's thread for the raylet's messages to drivers ("8 PYTHON worker processes have been
    started ...") prints through the module global print_to_stdstream, past the dispatcher:
    route_error_messages replaces that global, so those lines reach the run's log, not stdout."""
    from ray._private import worker

    if not callable(getattr(worker, "print_to_stdstream", None)):
        _fail("ray._private.worker.print_to_stdstream is gone: the raylet's messages now reach the driver another way")
    if "print_to_stdstream(" not in inspect.getsource(worker.listen_error_messages):
        _fail("ray._private.worker.listen_error_messages no longer prints through print_to_stdstream")
    monkeypatch.setattr(worker, "print_to_stdstream", worker.print_to_stdstream)  # restored after the test
    seen: list[dict] = []
    ray_private.route_error_messages(seen.append)
    message = {"lines": ["WARNING: 8 PYTHON worker processes have been started"], "pid": "raylet", "is_err": False}
    worker.print_to_stdstream(message, False)
    assert seen == [message]
