"""Every private or internal Ray API the project relies on, in one place.

Ray gives no stability promise for these names; a Ray upgrade may move, rename or change any of
them without a deprecation warning. The callers (tune/sweep.py, linrep/submit.py) import them only
through this module, and tests/test_ray_private.py checks each one (it exists, it is a class or a
function with the expected methods, attributes and signature) so that an upgrade fails there, in
one place and with a message naming what moved, instead of deep inside a sweep or a job submission.

Checked against Ray ``RAY_VERSION_CHECKED`` (the version requirements.lock pins). On an upgrade:
run tests/test_ray_private.py, fix what it names here, then update ``RAY_VERSION_CHECKED``.

What is used, and why there is no public way to do it in Ray 2.60:

- ``ray.train.v2._internal.execution.callback.ControllerCallback``: a Ray Train controller
  callback. The sweep needs the Train controller's actor handle to abort a trial's Train run
  when Tune stops the trial (ASHA); Ray's public ``UserCallback`` runs on the controller but is
  not told when the controller starts, so it cannot hand its handle out.
- ``TuneReportCallback._training_actor_item_queue`` (``ray.tune.integration.ray_train``): the
  one-slot queue through which Tune's callback hands a Train report to the trial. Tune's own
  ``after_report`` blocks on it forever once the trial is stopped (nobody reads it any more),
  which would also block the Train controller's event loop and with it the abort; the sweep's
  callback puts with a timeout instead.
- ``ray.tune.trainable.function_trainable.wrap_function``: turns a function into Tune's
  function trainable class. Subclassing that class is the only way to run code in the trial
  actor when Tune stops the trial (``cleanup``): the sweep aborts the trial's Train run there.
- ``ray._private.runtime_env.packaging._dir_travel`` / ``_get_excludes`` and
  ``ray._private.ray_constants`` (default excludes, the .gitignore switch): the rules Ray applies
  when it packs a job's ``working_dir``. ``linrep submit`` lists what will be uploaded before
  submitting (and refuses a job whose own package sources would be left out); using Ray's own
  traversal keeps that listing identical to what Ray uploads (.gitignore, .rayignore, excludes).
- ``PACKAGING_LOGGER``: the name of that packaging module's logger, quieted by ``linrep submit``.
- ``ray._private.ray_constants.ENABLE_RAY_CLUSTER`` and its variable
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``: Ray's single-machine mode. A local run must bind every
  socket to 127.0.0.1; ``ray.init(_node_ip_address="127.0.0.1")`` alone still binds GCS, the
  raylet and every worker to ``*`` (measured: 7 of 10 listeners), and only this mode, in the
  driver and in the processes it starts, keeps them all on loopback (10 of 10). The public
  switch is read once, when ray is imported; the driver may have imported ray already.
- ``ray._private.ray_logging.global_worker_stdstream_dispatcher`` and its ``ray_print_logs``
  handler: the driver's consumer of every worker's and actor's output (log_to_driver). The
  console (trainer/progress.py) replaces it so that progress lines reach the display and Ray's
  own lines reach the run's log file; Ray's public switches only turn the stream on or off
  (log_to_driver), and off would leave the driver without the workers' progress. Messages the
  raylet pushes to drivers bypass it: ``ray._private.worker.print_to_stdstream``, called by name
  from Ray's error-message thread, is replaced to send them the same way.
- ``ray.train.torch.config._TorchBackend`` and its ``_set_torch_distributed_env_vars``, with
  ``ray.train._internal.worker_group.WorkerGroup`` (Train V1's group, which Ray's ``on_start``
  tells apart): the backend that sets up torch's process group in the workers. Its gloo
  rendezvous, torch's TCPStore in rank 0, listens on the wildcard (``::``) whatever MASTER_ADDR
  says, and neither Ray nor torch has a switch for it. ``BoundRendezvousTorchBackend`` overrides
  ``on_start`` for gloo: rank 0 binds a socket to MASTER_ADDR itself and serves the TCPStore on it
  (``master_listen_fd``); ``BoundRendezvousTorchConfig`` (a public ``TorchConfig`` subclass, Ray's
  documented way to plug in a backend) names it as its ``backend_cls``.

Ray is imported inside each function: importing this module costs nothing. The two classes
above are built on first use too (module ``__getattr__``), and found here by name.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

RAY_VERSION_CHECKED = "2.60.0"

PACKAGING_MODULE = "ray._private.runtime_env.packaging"
PACKAGING_LOGGER = PACKAGING_MODULE  # Ray's module-level logger, named after its module

# The attribute of ray.tune.integration.ray_train.TuneReportCallback holding the trial's queue.
TRAINING_ITEM_QUEUE_ATTR = "_training_actor_item_queue"


# ---- Ray Train / Tune ---------------------------------------------------------------------
def controller_callback_class() -> type:
    """Ray Train v2's ControllerCallback: subclass it and override
    ``after_controller_start(self, train_run_context)``; it runs inside the controller actor."""
    from ray.train.v2._internal.execution.callback import ControllerCallback

    return ControllerCallback


def put_training_item(report_callback: Any, item: dict, timeout: float) -> None:
    """Put one Train report on the trial's queue of a TuneReportCallback (subclass) instance,
    waiting at most `timeout` seconds; raises ray.util.queue.Full when the slot stays taken."""
    getattr(report_callback, TRAINING_ITEM_QUEUE_ATTR).put(item, timeout=timeout)


def function_trainable_class(train_fn: Callable[[dict], None]) -> type:
    """Tune's function trainable class around `train_fn(config)`: subclass it to override
    ``cleanup`` (run in the trial actor when Tune stops the trial)."""
    from ray.tune.trainable.function_trainable import wrap_function

    return wrap_function(train_fn)


# ---- a local Ray that listens on loopback only ----------------------------------------------
LOCAL_MODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def use_single_machine_mode() -> None:
    """Make the next local ``ray.init`` bind GCS, raylet, workers and agents to 127.0.0.1 only.

    Sets the variable for the processes Ray starts and the constant the driver read at import.
    Only for a Ray this process starts itself: a driver joining a cluster needs its real address."""
    from ray._private import ray_constants

    os.environ[LOCAL_MODE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


# ---- the driver's stream of worker output ----------------------------------------------------
WORKER_OUTPUT_HANDLER = "ray_print_logs"  # the name ray.init gives its handler (log_to_driver=True)


def route_worker_output(handler: Callable[[dict], None]) -> Callable[[dict], None] | None:
    """Send the driver's batches of worker output ({"lines", "pid", "ip", "actor_name", ...}) to
    `handler` instead of Ray's printer; return Ray's printer (None if ray.init had none)."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    ray_printer = next((h for name, h in dispatcher.handlers if name == WORKER_OUTPUT_HANDLER), None)
    dispatcher.remove_handler(WORKER_OUTPUT_HANDLER)
    dispatcher.add_handler(WORKER_OUTPUT_HANDLER, handler)
    route_error_messages(handler)
    return ray_printer


def route_error_messages(handler: Callable[[dict], None]) -> None:
    """Send the messages the raylet pushes to drivers (``(raylet) WARNING: 8 PYTHON worker
    processes have been started ...`` during a sweep) to `handler` as well: Ray's thread for them
    prints each through ``ray._private.worker.print_to_stdstream`` straight to stdout, past the
    dispatcher, so a module global is the one place to catch them."""
    from ray._private import worker

    worker.print_to_stdstream = lambda data, ignore_prefix=False: handler(data)


# ---- job working_dir packaging ------------------------------------------------------------
def runtime_env_default_excludes() -> list[str]:
    """The exclude rules Ray always adds to a working_dir (.git, .venv, ...; env-overridable)."""
    from ray._private import ray_constants

    return list(ray_constants.get_runtime_env_default_excludes())


def working_dir_includes_gitignore(env: dict | os._Environ = os.environ) -> bool:
    """Whether Ray applies the working dir's .gitignore files (unless its switch variable is '1')."""
    from ray._private import ray_constants

    return env.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"


def walk_working_dir(root: Path, rules: list[str], handler: Callable[[Path], Any], include_gitignore: bool,
                     logger: logging.Logger) -> None:
    """Call `handler` on every path Ray's working_dir packaging would visit under `root`, with the
    gitwildmatch `rules` plus the .gitignore (when `include_gitignore`) and .rayignore files."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    _dir_travel(root, [_get_excludes(root, rules)], handler, include_gitignore=include_gitignore, logger=logger)


# ---- torch's process group: the gloo rendezvous on MASTER_ADDR only ---------------------------
BOUND_RENDEZVOUS_CLASSES = ("BoundRendezvousTorchConfig", "BoundRendezvousTorchBackend")

# Rank 0's master TCPStore between the two calls that set the group up (_serve_rendezvous, then
# _join_process_group): both run in rank 0's worker process, and the store must keep serving.
_rank0_store: dict[str, Any] = {}


def bound_torch_config(backend: str) -> Any:
    """Ray Train's TorchConfig for `backend` ("gloo" or "nccl"); with gloo, the process group's
    rendezvous (torch's TCPStore in rank 0) listens on MASTER_ADDR only: 127.0.0.1 in a local
    run, the node's address on a cluster. Ray's own listens on the wildcard."""
    config_class, _ = _bound_rendezvous_classes()
    return config_class(backend=backend)


def __getattr__(name: str) -> type:
    """The two Ray subclasses, built on first use and found here by name, so that pickle sends
    them to Ray's controller and workers by reference (PEP 562)."""
    if name not in BOUND_RENDEZVOUS_CLASSES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return dict(zip(BOUND_RENDEZVOUS_CLASSES, _bound_rendezvous_classes()))[name]


@functools.cache
def _bound_rendezvous_classes() -> tuple[type, type]:
    import ray
    import torch.distributed as dist
    from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
    from ray.train.torch.config import TorchConfig, _set_torch_distributed_env_vars, _TorchBackend

    class BoundRendezvousTorchBackend(_TorchBackend):
        """Ray's torch backend, but a gloo group's rendezvous listens on MASTER_ADDR only (the
        group always starts from the store: the config's init_method is not used for gloo)."""

        def on_start(self, worker_group, backend_config) -> None:
            if backend_config.backend != "gloo" or not dist.is_available():
                return super().on_start(worker_group, backend_config)  # NCCL, GPUs: as Ray does it
            world_size, timeout_s = len(worker_group), backend_config.timeout_s
            # rank 0 listens before anyone is told the port: the port is never free in between
            addr, port = worker_group.execute_single(0, _serve_rendezvous, world_size, timeout_s)
            worker_group.execute(_set_master_env, addr, port)  # what Ray's env:// setup leaves behind
            if not isinstance(worker_group, V1WorkerGroup):  # as Ray: V1 sets these at training start
                worker_group.execute(_set_torch_distributed_env_vars)
            ray.get([worker_group.execute_single_async(rank, _join_process_group, backend_config.backend, rank,
                                                       world_size, addr, port, timeout_s)
                     for rank in range(world_size)])

    class BoundRendezvousTorchConfig(TorchConfig):
        """TorchConfig whose backend is BoundRendezvousTorchBackend."""

        @property
        def backend_cls(self):
            return BoundRendezvousTorchBackend

    for cls in (BoundRendezvousTorchConfig, BoundRendezvousTorchBackend):
        cls.__qualname__ = cls.__name__  # so that pickle finds it as trainer.ray_private.<name>
    return BoundRendezvousTorchConfig, BoundRendezvousTorchBackend


def _serve_rendezvous(world_size: int, timeout_s: float) -> tuple[str, int]:
    """In rank 0: bind a socket to this node's address (port 0: the kernel picks a free one, so
    nothing can take it before the store listens), serve a master TCPStore on it, keep the store
    for _join_process_group; return (address, port)."""
    import ray
    from torch.distributed import TCPStore

    addr = ray.util.get_node_ip_address()
    listener = socket.create_server((addr, 0), family=socket.AF_INET6 if ":" in addr else socket.AF_INET)
    port = listener.getsockname()[1]
    # the store owns the descriptor from here on (it closes it when it goes): detach, not close
    _rank0_store["store"] = TCPStore(addr, port, world_size, is_master=True, timeout=timedelta(seconds=timeout_s),
                                     wait_for_workers=False, master_listen_fd=listener.detach())
    return addr, port


def _set_master_env(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)


def _join_process_group(backend: str, world_rank: int, world_size: int, addr: str, port: int,
                        timeout_s: float) -> None:
    """In every worker: torch's default process group over rank 0's TCPStore (rank 0 holds the
    master; the others connect a client to addr:port)."""
    import torch.distributed as dist
    from torch.distributed import TCPStore

    timeout = timedelta(seconds=timeout_s)
    if world_rank == 0:
        store = _rank0_store.pop("store")
    else:
        store = TCPStore(addr, port, world_size, is_master=False, timeout=timeout)
    # the process group keeps the store; destroy_process_group (Ray's on_shutdown) closes it
    dist.init_process_group(backend=backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)
