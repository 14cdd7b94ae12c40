#!/usr/bin/env bash
# A one-machine "cluster" for linrep: a Ray head node (Jobs API + dashboard) and an MLflow tracking
# server (sqlite backend, artifacts on disk), every socket bound to 127.0.0.1.
#
#   infra/local/cluster.sh up       start what is not running yet (idempotent), print how to use it
#   infra/local/cluster.sh status   what runs, on which addresses (exit 0: all up, 3: not all up)
#   infra/local/cluster.sh down     stop both, remove pid files, the token and Ray's temp dir
#                                   (keeps mlflow.db + artifacts/; `down --purge` removes them too)
#
# Settings (environment):
#   LINREP_CLUSTER_DIR     state dir: pid files, logs, token, mlflow.db, artifacts (./.linrep-cluster)
#   LINREP_RAY_PORT        Ray GCS port (6379)
#   LINREP_DASHBOARD_PORT  Ray dashboard + Jobs API port (8265)
#   LINREP_MLFLOW_PORT     MLflow tracking server port (5000)
#   LINREP_PYTHON          interpreter whose ray/mlflow to run (./.venv/bin/python, else python3)
#   LINREP_NUM_CPUS / LINREP_NUM_GPUS   resources the head node offers (default: all detected)
#
# Security: the Jobs API runs arbitrary code, so the head uses Ray token auth; the token is
# $LINREP_CLUSTER_DIR/auth_token (mode 600). `source $LINREP_CLUSTER_DIR/env` exports it together
# with the addresses for `linrep submit` / `linrep jobs` and for MLflow clients.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=infra/local/common.sh
source "$HERE/common.sh"  # ROOT, PY, BIN
RAY="$BIN/ray"
MLFLOW="$BIN/mlflow"
LIB=("$PY" "$HERE/clusterlib.py")

STATE="${LINREP_CLUSTER_DIR:-./.linrep-cluster}"
[[ "$STATE" == /* ]] || STATE="$PWD/${STATE#./}"
RAY_PORT="${LINREP_RAY_PORT:-6379}"
DASH_PORT="${LINREP_DASHBOARD_PORT:-8265}"
MLFLOW_PORT="${LINREP_MLFLOW_PORT:-5000}"
HOST=127.0.0.1

TOKEN="$STATE/auth_token"
LOGS="$STATE/logs"
RAY_PID="$STATE/ray.pid"
MLFLOW_PID="$STATE/mlflow.pid"
RAY_TMP_FILE="$STATE/ray.tmpdir"

die() { echo "cluster.sh: $*" >&2; exit 1; }

need_tools() {
  [[ -x "$PY" ]] || die "no Python at '$PY': install the project (make install) or set LINREP_PYTHON"
  [[ -x "$RAY" ]] || die "no 'ray' next to $PY: install the project (make install) or set LINREP_PYTHON"
  [[ -x "$MLFLOW" ]] || die "no 'mlflow' next to $PY: install the project (make install) or set LINREP_PYTHON"
}

# A pid file names a live process of ours only if the command line still matches (pid reuse).
ray_alive()    { [[ -f "$RAY_PID" ]] && "${LIB[@]}" alive "$(cat "$RAY_PID")" --expect="--port=$RAY_PORT --include-dashboard"; }
mlflow_alive() { [[ -f "$MLFLOW_PID" ]] && "${LIB[@]}" alive "$(cat "$MLFLOW_PID")" --expect="--port $MLFLOW_PORT --workers"; }

check_port() {  # $1 port, $2 the variable that sets it
  "${LIB[@]}" port-free "$1" || die "port $1 on $HOST is already in use: free it or set $2"
}

write_env_file() {  # for `source`: what linrep submit/jobs and MLflow clients need
  local tmp="$STATE/env.tmp"
  cat > "$tmp" <<EOF
# written by infra/local/cluster.sh up; \`source\` it to use this cluster
export RAY_API_SERVER_ADDRESS=http://$HOST:$DASH_PORT
export RAY_AUTH_TOKEN_PATH=$TOKEN
export MLFLOW_TRACKING_URI=http://$HOST:$MLFLOW_PORT
EOF
  mv -f "$tmp" "$STATE/env"
  "${LIB[@]}" write-json "$STATE/cluster.json" "dashboard=http://$HOST:$DASH_PORT" \
    "gcs=$HOST:$RAY_PORT" "mlflow=http://$HOST:$MLFLOW_PORT" "token_file=$TOKEN" \
    "ray_pid=$(cat "$RAY_PID")" "mlflow_pid=$(cat "$MLFLOW_PID")"
}

start_ray() {
  if [[ ! -s "$TOKEN" ]]; then
    (umask 077 && "${LIB[@]}" token > "$TOKEN.tmp" && mv -f "$TOKEN.tmp" "$TOKEN")
  fi
  # Ray's unix sockets live under --temp-dir and must stay < 108 characters: keep it short, and
  # separate from /tmp/ray so other Ray users on this machine never join this head by accident.
  local tmp
  tmp="$(mktemp -d /tmp/linrep-ray-XXXXXX)"
  echo "$tmp" > "$RAY_TMP_FILE"
  # Ports Ray would otherwise take from fixed defaults (shared by every Ray on the host).
  local p=($("${LIB[@]}" free-ports 5))
  local extra=()
  [[ -n "${LINREP_NUM_CPUS:-}" ]] && extra+=("--num-cpus=$LINREP_NUM_CPUS")
  [[ -n "${LINREP_NUM_GPUS:-}" ]] && extra+=("--num-gpus=$LINREP_NUM_GPUS")
  echo "starting Ray head on $HOST:$RAY_PORT (dashboard + Jobs API http://$HOST:$DASH_PORT)"
  # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray's single-machine mode, where the node IP stays
  #   127.0.0.1; otherwise Ray replaces 127.0.0.1 by the host's routable IP and binds gRPC
  #   servers (GCS, raylet, agents, client server) to it.
  # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0: no 30 s node drain on SIGTERM (no Serve here).
  # MLFLOW_TRACKING_URI: jobs and their workers log to this cluster's server by default.
  # No inherited RAY_AUTH_TOKEN (it would outrank the token file) or RAY_ADDRESS.
  local pid
  pid=$(env -u RAY_AUTH_TOKEN -u RAY_ADDRESS RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN" \
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 \
        RAY_USAGE_STATS_ENABLED=0 AUTOSCALER_METRIC_PORT="${p[0]}" DASHBOARD_METRIC_PORT="${p[1]}" \
        MLFLOW_TRACKING_URI="http://$HOST:$MLFLOW_PORT" \
        "${LIB[@]}" spawn "$LOGS/ray.log" -- "$RAY" start --head --block \
          --node-ip-address="$HOST" --port="$RAY_PORT" \
          --include-dashboard=true --dashboard-host="$HOST" --dashboard-port="$DASH_PORT" \
          --ray-client-server-port="${p[2]}" --dashboard-agent-listen-port="${p[3]}" \
          --metrics-export-port="${p[4]}" --temp-dir="$tmp" --disable-usage-stats ${extra[@]+"${extra[@]}"})
  echo "$pid" > "$RAY_PID"
}

start_mlflow() {
  mkdir -p "$STATE/artifacts"
  echo "starting MLflow server on http://$HOST:$MLFLOW_PORT (store $STATE/mlflow.db)"
  # One worker and no server-side job runner: a laptop-sized server, few processes.
  local pid
  pid=$(env MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
        "${LIB[@]}" spawn "$LOGS/mlflow.log" -- "$MLFLOW" server --host "$HOST" --port "$MLFLOW_PORT" \
          --workers 1 --backend-store-uri "sqlite:///$STATE/mlflow.db" \
          --artifacts-destination "$STATE/artifacts")
  echo "$pid" > "$MLFLOW_PID"
}

wait_ready() {  # both servers answer, or show the logs and stop what this call started
  local why=""
  why=$("${LIB[@]}" wait-http "http://$HOST:$DASH_PORT/api/jobs/" --timeout 120 \
        --pid "$(cat "$RAY_PID")" --token-file "$TOKEN" 2>&1) \
  && why=$("${LIB[@]}" wait-http "http://$HOST:$MLFLOW_PORT/health" --timeout 120 \
        --pid "$(cat "$MLFLOW_PID")" 2>&1) && return 0
  echo "cluster.sh: not ready: $why" >&2
  for log in "$LOGS/ray.log" "$LOGS/mlflow.log"; do
    if [[ -f "$log" ]]; then echo "--- last lines of $log" >&2; tail -n 15 "$log" >&2; fi
  done
  trap - ERR
  stop_started
  exit 1
}

STARTED=()
stop_started() {  # undo a failed `up`: only what this call started, never a head that was running
  local svc
  for svc in ${STARTED[@]+"${STARTED[@]}"}; do
    case "$svc" in
      mlflow) stop_one "MLflow server" "$MLFLOW_PID" mlflow_alive >&2 ;;
      ray) stop_one "Ray head" "$RAY_PID" ray_alive >&2; stop_ray_quietly ;;
    esac
  done
  rm -f "$STATE/env" "$STATE/cluster.json"
}

print_usage_hint() {
  cat <<EOF
cluster up:
  Ray Jobs API + dashboard  http://$HOST:$DASH_PORT   (token: $TOKEN)
  Ray GCS                   $HOST:$RAY_PORT
  MLflow tracking server    http://$HOST:$MLFLOW_PORT
use it:
  source $STATE/env
  linrep submit train synthetic-supervised optim.steps=300
  linrep jobs list
stop it:
  infra/local/cluster.sh down
EOF
}

cmd_up() {
  need_tools
  mkdir -p "$LOGS"
  chmod 700 "$STATE"
  local need_ray=1 need_mlflow=1
  if ray_alive; then need_ray=0; echo "Ray head already running (pid $(cat "$RAY_PID"))"; fi
  if mlflow_alive; then need_mlflow=0; echo "MLflow server already running (pid $(cat "$MLFLOW_PID"))"; fi
  # Every port is checked before anything starts, so a conflict leaves nothing behind.
  if (( need_ray )); then check_port "$RAY_PORT" LINREP_RAY_PORT; check_port "$DASH_PORT" LINREP_DASHBOARD_PORT; fi
  if (( need_mlflow )); then check_port "$MLFLOW_PORT" LINREP_MLFLOW_PORT; fi
  trap 'echo "cluster.sh: up failed; stopping what it started" >&2; stop_started' ERR
  if (( need_ray )); then stop_ray_quietly; STARTED+=(ray); start_ray; fi
  if (( need_mlflow )); then rm -f "$MLFLOW_PID"; STARTED+=(mlflow); start_mlflow; fi
  wait_ready
  write_env_file
  trap - ERR
  if (( ! need_ray && ! need_mlflow )); then echo "already up: nothing to start"; fi
  print_usage_hint
}

stop_one() {  # $1 name, $2 pid file, $3 alive-check function
  local pid
  if [[ -f "$2" ]]; then
    pid="$(cat "$2")"
    if "$3"; then
      echo "stopping $1 (process group $pid)"
      "${LIB[@]}" stop "$pid" --timeout 20
    else
      echo "$1: not running (stale pid file removed)"
    fi
    rm -f "$2"
  else
    echo "$1: not running"
  fi
}

stop_ray_quietly() {  # before a fresh start: leftovers of a crashed head
  rm -f "$RAY_PID"
  if [[ -f "$RAY_TMP_FILE" ]]; then rm -rf "$(cat "$RAY_TMP_FILE")"; rm -f "$RAY_TMP_FILE"; fi
}

cmd_down() {
  [[ -x "$PY" ]] || die "no Python at '$PY' (set LINREP_PYTHON)"
  if [[ ! -d "$STATE" ]]; then echo "not up (no state dir $STATE)"; return 0; fi
  stop_one "MLflow server" "$MLFLOW_PID" mlflow_alive
  stop_one "Ray head" "$RAY_PID" ray_alive
  if [[ -f "$RAY_TMP_FILE" ]]; then
    local tmp
    tmp="$(cat "$RAY_TMP_FILE")"
    [[ "$tmp" == /tmp/linrep-ray-* ]] && rm -rf "$tmp"
    rm -f "$RAY_TMP_FILE"
  fi
  rm -f "$STATE/env" "$STATE/cluster.json" "$TOKEN" "$TOKEN.tmp" "$STATE/env.tmp"
  if [[ "${1:-}" == "--purge" ]]; then
    rm -rf "$STATE/mlflow.db" "$STATE/artifacts" "$LOGS"
    rmdir "$STATE" 2>/dev/null || true
    echo "down; state purged"
  else
    echo "down (runs kept in $STATE/mlflow.db and $STATE/artifacts; 'down --purge' removes them)"
  fi
}

cmd_status() {
  [[ -x "$PY" ]] || die "no Python at '$PY' (set LINREP_PYTHON)"
  local up=0 pids=()
  if [[ ! -d "$STATE" ]]; then echo "not up (no state dir $STATE)"; exit 3; fi
  if ray_alive; then
    echo "Ray head: running, pid $(cat "$RAY_PID"), Jobs API http://$HOST:$DASH_PORT"
    up=$((up + 1)); pids+=("$(cat "$RAY_PID")")
  else echo "Ray head: stopped"; fi
  if mlflow_alive; then
    echo "MLflow server: running, pid $(cat "$MLFLOW_PID"), http://$HOST:$MLFLOW_PORT"
    up=$((up + 1)); pids+=("$(cat "$MLFLOW_PID")")
  else echo "MLflow server: stopped"; fi
  if (( up )); then
    echo "listening sockets:"
    "${LIB[@]}" listeners "${pids[@]}"
  fi
  [[ $up == 2 ]] || exit 3
}

case "${1:-}" in
  up) cmd_up ;;
  down) shift; cmd_down "${1:-}" ;;
  status) cmd_status ;;
  *) echo "usage: $0 up|down [--purge]|status   (see the header of this file for settings)" >&2; exit 2 ;;
esac
