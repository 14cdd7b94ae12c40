# Sourced by infra/local/bed.sh and infra/local/cluster.sh (never run): what both scripts share.
# The caller sets HERE (its own folder) before sourcing; this sets ROOT (the checkout), PY (the
# interpreter whose ray/mlflow/moto run: $LINREP_PYTHON, else the checkout's .venv, else python3)
# and BIN (that interpreter's folder, where the ray and mlflow entry points are).
ROOT="$(cd "$HERE/../.." && pwd)"
if [[ -n "${LINREP_PYTHON:-}" ]]; then PY="$LINREP_PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"
else PY="$(command -v python3 || true)"; fi
BIN="$(dirname "$PY")"
