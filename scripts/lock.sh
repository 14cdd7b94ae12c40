#!/usr/bin/env bash
# Regenerate requirements.lock (run it as `make lock`): pip-tools' pip-compile pins the whole
# environment from pyproject.toml's dependencies, its [test] and [bench] extras, and the torch /
# torchvision pins of the Makefile's TORCH_SPEC (pyproject leaves torch unpinned so that a user can
# install another CUDA build first).
#
# pip-tools runs in a venv of its own (LOCK_VENV), never in the project's .venv: its pip version
# and its own dependencies must not leak into the environment it pins.
# The lock is for Linux x86-64 and Python 3.11 (the Dockerfile's and CI's); it includes torch's
# CUDA wheels (nvidia-*) as PyPI's torch 2.14.1 requires them.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
LOCK_VENV=${LOCK_VENV:-${TMPDIR:-/tmp}/linrep-lockvenv}
PIP_TOOLS_SPEC=${PIP_TOOLS_SPEC:-pip-tools==7.6.2}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}

if [ ! -x "$LOCK_VENV/bin/pip-compile" ]; then
  "$PYTHON" -m venv "$LOCK_VENV"
  "$LOCK_VENV/bin/python" -m pip install -q "$PIP_TOOLS_SPEC"
fi

# The requirement tokens of TORCH_SPEC (name==version), without its pip options (--index-url ...).
pins=$(mktemp --suffix=.in)
trap 'rm -f "$pins"' EXIT
for word in $TORCH_SPEC; do
  case "$word" in
    -*) break ;;  # options end the requirement list
    *) echo "$word" >> "$pins" ;;
  esac
done

# --strip-extras: ray's extras appear as their own pinned packages (a plain requirements file);
# --allow-unsafe: setuptools (a torch dependency) is pinned too;
# --no-emit-*: the lock names packages, not this machine's package sources.
CUSTOM_COMPILE_COMMAND="make lock" \
"$LOCK_VENV/bin/pip-compile" --quiet --resolver=backtracking --strip-extras --allow-unsafe \
  --no-emit-index-url --no-emit-trusted-host --no-emit-find-links \
  --extra test --extra bench \
  --output-file requirements.lock \
  pyproject.toml "$pins"

# pip-compile names the temporary pins file in its "via" comments: name the Makefile instead.
sed -i "s|-r $pins|TORCH_SPEC (Makefile)|g" requirements.lock
echo "requirements.lock: $(grep -c '==' requirements.lock) pinned packages"
