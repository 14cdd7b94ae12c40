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
  (log_to_driver), and off would leave the driver without the workers' progress.

Ray is imported inside each function: importing this module costs nothing.
"""

from __future__ import annotations

import logging
import os
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
    return ray_printer


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
