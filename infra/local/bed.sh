#!/usr/bin/env bash
# A real multi-node cluster on one machine (the test bed): a Ray head and two Ray worker nodes
# (w1, w2) plus a `client` node where a user sits, each its own Linux network namespace on a
# private subnet, joined by a bridge in a namespace of its own. Nothing is routed to or from the
# machine's own (root) namespace. Each node also has its own PID namespace (so one kill stops every
# process of a node) and mount namespace (its own /tmp and /home, HOME=/home/root; /srv is the shared volume, the
# stand-in for NFS).
#
# The head also runs what a real cluster gets as managed services:
#   PostgreSQL      MLflow's backend store (the managed database), HEAD:5432, password auth
#   moto (S3 API)   the object store (S3/MinIO), http://HEAD:9000, buckets linrep, linrep-artifacts
#   MLflow server   tracking server http://HEAD:5000, runs in Postgres, artifacts in s3://linrep-artifacts
#   Ray head        GCS HEAD:6379, dashboard + Jobs API http://HEAD:8265, token auth, 0 CPUs
# w1 and w2 are Ray workers with 1 CPU and a custom resource each (bed_w1, bed_w2).
#
#   bed.sh up                 create what is missing, start what is not running, wait until ready
#   bed.sh down [--purge]     stop every bed process, delete the namespaces (--purge: the state too)
#   bed.sh status             nodes, servers, and every listening socket in every bed namespace
#   bed.sh exec NODE CMD...   run CMD on NODE (head|w1|w2|client); on `client` with the user's
#                             environment (Jobs API, GCS, MLflow, S3 endpoint and credentials, token)
#   bed.sh env                that client environment as `export` lines (for a shell on `client`)
#   bed.sh kill-node NODE     kill every process of NODE at once (its network stays: see start-node)
#   bed.sh start-node NODE    start a killed worker node again (w1|w2)
#
# Settings (environment):
#   LINREP_BED_DIR      state: pids, logs, secrets, each node's /tmp and HOME (/tmp/linrep-bed)
#   LINREP_BED_NAME     prefix of the namespaces (lrbed: lrbed-head, lrbed-w1, ..., lrbed-br)
#   LINREP_BED_NET      the bed's /24, first three octets (10.77.0)
#   LINREP_PYTHON       interpreter whose ray/mlflow/moto run on the nodes (the current venv's)
#   LINREP_PG_BIN       PostgreSQL's bin folder (the newest /usr/lib/postgresql/*/bin)
#   LINREP_BED_STORAGE  LINREP_STORAGE on every node: where runs keep checkpoints (/srv/ray_results)
#
# Needs root (namespaces, mounts) and iproute2's `ip netns`, util-linux's unshare/nsenter/runuser.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=infra/local/common.sh
source "$HERE/common.sh"  # ROOT, PY, BIN
LIB=("$PY" "$HERE/bedlib.py")
PG_BIN="${LINREP_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}"

# ---- the bed's layout: every name and address in one place ---------------------------------
NAME="${LINREP_BED_NAME:-lrbed}"
NET="${LINREP_BED_NET:-10.77.0}"
NODES=(head w1 w2 client)
WORKERS=(w1 w2)
declare -A IP=([head]="$NET.1" [w1]="$NET.11" [w2]="$NET.12" [client]="$NET.100")
BR_NS="$NAME-br"
HEAD="${IP[head]}"
RAY_PORT=6379 DASH_PORT=8265 MLFLOW_PORT=5000 S3_PORT=9000 PG_PORT=5432
BUCKETS=(linrep linrep-artifacts)
STORAGE="${LINREP_BED_STORAGE:-/srv/ray_results}"
OBJECT_STORE_BYTES=$((256 * 1024 * 1024))  # per node; the default (30% of RAM) x 3 nodes is far too much here

BED="${LINREP_BED_DIR:-/tmp/linrep-bed}"
[[ "$BED" == /* ]] || BED="$PWD/${BED#./}"
RUN="$BED/run"            # <node>.pid: the root-namespace pid of each node's init (PID 1 inside)
LOGS="$BED/logs"
SECRETS="$BED/secrets"    # ray token, Postgres and S3 credentials (mode 700)
SHARED="$BED/shared"      # /srv on every node

die() { echo "bed.sh: $*" >&2; exit 1; }
ns() { echo "$NAME-$1"; }
node_dir() { echo "$BED/nodes/$1"; }   # its tmp/ is the node's /tmp, its home/ the node's /home
node_home() { echo "$BED/nodes/$1/home/root"; }   # HOME=/home/root on the node

need_root() {
  [[ "$(id -u)" == 0 ]] || die "needs root (network, PID and mount namespaces) and iproute2's 'ip netns'"
  command -v ip > /dev/null && ip netns list > /dev/null 2>&1 || die "needs iproute2's 'ip netns' (apt-get install iproute2)"
  local t
  for t in unshare nsenter runuser ss; do command -v "$t" > /dev/null || die "needs '$t' (apt-get install util-linux iproute2)"; done
}

need_tools() {  # what `up` starts
  need_root
  [[ -x "$PY" ]] || die "no Python at '$PY': install the project (make install) or set LINREP_PYTHON"
  [[ -x "$BIN/ray" && -x "$BIN/mlflow" ]] || die "no 'ray'/'mlflow' next to $PY: install the project or set LINREP_PYTHON"
  "$PY" -c "import moto.server, psycopg2, boto3" 2> /dev/null \
    || die "$PY lacks moto/psycopg2/boto3: pip install -e '.[test]' (or pip install -r requirements.lock)"
  [[ -x "$PG_BIN/initdb" ]] || die "no PostgreSQL server (initdb) in '$PG_BIN': apt-get install postgresql, or set LINREP_PG_BIN"
  id postgres > /dev/null 2>&1 || die "no 'postgres' user to run PostgreSQL as: apt-get install postgresql"
  local real
  for real in $(keep_paths); do
    case "$real" in /srv/*) die "$real is under /srv, the nodes' shared volume: use an interpreter and checkout elsewhere" ;; esac
  done
}

# The checkout, the venv and the interpreter's real folder: each node sees them at their own paths,
# even when they lie under /tmp or /home, which each node replaces by its own (a CI clone in a
# mktemp folder, a venv elsewhere under /tmp).
keep_paths() {
  local real
  for real in "$(cd "$HERE/../.." && pwd -P)" "$(cd "$BIN/.." && pwd -P)" "$(dirname "$(readlink -f "$PY")")"; do
    case "$real" in /tmp/*|/home/*|/srv/*) echo "$real" ;; esac
  done
}

need_node() {
  [[ -n "${IP[$1]+x}" ]] || die "no node '$1' (nodes: ${NODES[*]})"
}

# ---- network -------------------------------------------------------------------------------
ns_exists() { ip netns list | awk '{print $1}' | grep -qx "$1"; }

net_up() {  # idempotent: the bridge namespace, then one veth per node (eth0 inside, v-<node> on the bridge)
  ns_exists "$BR_NS" || ip netns add "$BR_NS"
  ip -n "$BR_NS" link show br0 > /dev/null 2>&1 || ip -n "$BR_NS" link add br0 type bridge
  ip -n "$BR_NS" link set lo up
  ip -n "$BR_NS" link set br0 up
  local node n
  for node in "${NODES[@]}"; do
    n="$(ns "$node")"
    ns_exists "$n" || ip netns add "$n"
    if ! ip -n "$n" link show eth0 > /dev/null 2>&1; then
      ip -n "$BR_NS" link del "v-$node" 2> /dev/null || true
      # Both ends are created straight inside their namespaces: no name ever appears in the root one.
      ip link add eth0 netns "$n" type veth peer name "v-$node" netns "$BR_NS"
    fi
    ip -n "$n" addr replace "${IP[$node]}/24" dev eth0
    ip -n "$n" link set lo up
    ip -n "$n" link set eth0 up
    ip -n "$BR_NS" link set "v-$node" master br0 up
  done
}

# ---- nodes: one PID + mount namespace each, with a tiny init as PID 1 ----------------------
init_pid() { [[ -f "$RUN/$1.pid" ]] && cat "$RUN/$1.pid"; }
init_alive() { local p; p="$(init_pid "$1")" && "${LIB[@]}" alive "$p" --expect "bedlib.py init $1"; }

# Runs as PID 1 of the node before the init: the node's own hostname and /etc/hosts (its name must
# resolve to its bed address, as on a real cluster: Gloo, for one, advertises what the hostname
# resolves to), its own /tmp and /home, the shared /srv. The
# bind sources are resolved before /tmp is covered (the bed dir may itself be under /tmp). /root is
# left alone: the interpreter may live there (pyenv).
INIT_SH='set -eu
hostname "$7"
mount --bind "$8" /etc/hosts
for keep in $9; do  # the checkout/interpreter, bound at the same path inside the node folders
  case "$keep" in
    /tmp/*) mkdir -p "$2/${keep#/tmp/}"; mount --rbind "$keep" "$2/${keep#/tmp/}" ;;
    /home/*) mkdir -p "$3/${keep#/home/}"; mount --rbind "$keep" "$3/${keep#/home/}" ;;
  esac
done
mount --bind "$4" /srv
mount --rbind "$3" /home
mount --rbind "$2" /tmp
cd /
exec "$5" "$6" init "$1"'

write_hosts() {  # $1 file: every node by its hostname (lrbed-w1) and short name (w1)
  local node
  { echo "127.0.0.1 localhost"
    for node in "${NODES[@]}"; do echo "${IP[$node]} $(ns "$node") $node"; done
  } > "$1"
  chmod 644 "$1"
}

start_init() {  # $1 node
  local node="$1" d upid pid
  init_alive "$node" && return 0
  d="$(node_dir "$node")"
  mkdir -p "$d/tmp" "$(node_home "$node")/.ray" "$SHARED" "$RUN" "$LOGS"
  chmod 1777 "$d/tmp"; chmod 755 "$d/home"; chmod 700 "$(node_home "$node")"
  install -m 600 "$SECRETS/ray_token" "$(node_home "$node")/.ray/auth_token"  # Ray's default token path (~/.ray/auth_token)
  write_hosts "$d/hosts"
  # setsid: the node outlives this shell; --kill-child: if unshare dies, so does the node;
  # --uts: its own hostname.
  setsid ip netns exec "$(ns "$node")" unshare --pid --fork --mount-proc --uts --kill-child \
    bash -c "$INIT_SH" bed-init "$node" "$d/tmp" "$d/home" "$SHARED" "$PY" "$HERE/bedlib.py" \
      "$(ns "$node")" "$d/hosts" "$(keep_paths | tr '\n' ' ')" \
    >> "$LOGS/$node.init.log" 2>&1 < /dev/null &
  upid=$!
  pid="$("${LIB[@]}" child-of "$upid")" || die "node $node: its PID namespace did not start (see $LOGS/$node.init.log)"
  echo "$pid" > "$RUN/$node.pid"
  local i
  # up to 60 s: the init is a Python process, and 10 s was too short once with the 2-core machine
  # at load average 5 (a second test run alongside); alone it answers within a second
  for i in $(seq 600); do init_alive "$node" && return 0; sleep 0.1; done
  die "node $node: init did not start (see $LOGS/$node.init.log)"
}

# Run a command inside a node (its network, PID and mount namespaces) with the node's environment.
# Everything is exported, never put on a command line: credentials stay out of argv.
node_exec() {  # $1 node, then the command
  local node="$1"; shift
  local pid
  pid="$(init_pid "$node")" && init_alive "$node" || die "node $node is not running (bed.sh up)"
  # The caller's working dir, unless the node has its own version of that path (/tmp, /home, /srv)
  # and it is not inside the checkout or interpreter folder bound into every node (keep_paths).
  local wd="$PWD" keep inside=""
  for keep in $(keep_paths); do
    case "$wd/" in "$keep"/*) inside=1 ;; esac
  done
  if [[ -z "$inside" ]]; then
    case "$wd/" in /tmp/*|/home/*|/srv/*) wd=/ ;; esac
  fi
  (
    node_env "$node"
    exec nsenter --target "$pid" --net --pid --mount --uts --wd="$wd" -- "$@"
  )
}

node_env() {  # exports the environment of processes on node $1 (in a subshell of node_exec)
  local v
  for v in $(compgen -e); do
    case "$v" in RAY_*|MLFLOW_*|AWS_*|PGPASS*|PGPASSWORD) unset "$v" ;; esac
  done
  export HOME=/home/root TMPDIR=/tmp USER=root
  export PATH="$BIN:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0
  export MLFLOW_TRACKING_URI="http://$HEAD:$MLFLOW_PORT"
  export AWS_ENDPOINT_URL="http://$HEAD:$S3_PORT" AWS_ENDPOINT_URL_S3="http://$HEAD:$S3_PORT"
  export MLFLOW_S3_ENDPOINT_URL="http://$HEAD:$S3_PORT" AWS_DEFAULT_REGION=us-east-1 AWS_REGION=us-east-1
  AWS_ACCESS_KEY_ID="$(cat "$SECRETS/s3_key_id")"; AWS_SECRET_ACCESS_KEY="$(cat "$SECRETS/s3_secret")"
  export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
  export LINREP_STORAGE="$STORAGE"
  if [[ "$1" != client ]]; then
    # Ray nodes: a killed node is declared dead in ~3 s rather than ~15 s; no 30 s drain on stop.
    export RAY_health_check_period_ms=1000 RAY_health_check_timeout_ms=1000 RAY_health_check_failure_threshold=3
    export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
  fi
  if [[ "$1" == client ]]; then
    # The client is no Ray node: it reaches Ray through the Jobs API (ray job, linrep submit) or
    # Ray Client (ray.init("ray://HEAD:10001")); a plain driver needs a raylet on its own node.
    export RAY_ADDRESS="http://$HEAD:$DASH_PORT" RAY_API_SERVER_ADDRESS="http://$HEAD:$DASH_PORT"
    export RAY_AUTH_TOKEN_PATH=/home/root/.ray/auth_token
  fi
}

node_spawn() {  # $1 node, $2 log name, then a server command: detached, reparented to the node's init
  local node="$1" log="$LOGS/$1.$2.log"; shift 2
  node_exec "$node" setsid -f "$@" >> "$log" 2>&1 < /dev/null
}

listening() {  # $1 node, $2 port: something listens on it inside the node
  [[ -n "$(ip netns exec "$(ns "$1")" ss -Hltn "sport = :$2" 2> /dev/null)" ]]
}

has_process() {  # $1 node, $2 substring of a command line
  local pid
  pid="$(init_pid "$1")" && "${LIB[@]}" ns-pids "$pid" --match "$2" > /dev/null
}

# ---- secrets (generated once, kept across down/up so the database stays usable) -------------
make_secrets() {
  mkdir -p "$SECRETS"; chmod 700 "$SECRETS"
  local f
  for f in ray_token pg_password s3_key_id s3_secret; do
    [[ -s "$SECRETS/$f" ]] || (umask 077 && "${LIB[@]}" token > "$SECRETS/$f.tmp" && mv -f "$SECRETS/$f.tmp" "$SECRETS/$f")
  done
}

# ---- servers on the head ---------------------------------------------------------------------
start_postgres() {
  listening head "$PG_PORT" && { echo "PostgreSQL already running on $HEAD:$PG_PORT"; return 0; }
  local data=/tmp/pgdata host_data
  host_data="$(node_dir head)/tmp/pgdata"
  if [[ ! -s "$host_data/PG_VERSION" ]]; then
    echo "initialising PostgreSQL in $host_data"
    rm -rf "$host_data"
    # Local (unix socket) logins by OS user only: the admin needs no password; TCP needs one.
    node_exec head runuser -u postgres -- "$PG_BIN/initdb" -D "$data" -U postgres \
      --auth-local=peer --auth-host=scram-sha-256 > "$LOGS/head.initdb.log" 2>&1 \
      || { tail -n 5 "$LOGS/head.initdb.log" >&2; die "initdb failed (log: $LOGS/head.initdb.log)"; }
    # Only MLflow (on the head itself) may log in over TCP.
    echo "host mlflow mlflow $HEAD/32 scram-sha-256" >> "$host_data/pg_hba.conf"
  fi
  echo "starting PostgreSQL on $HEAD:$PG_PORT"
  node_exec head runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$data" -l /tmp/postgres.log -w -t 60 \
    -o "-c listen_addresses=$HEAD -c port=$PG_PORT -c unix_socket_directories=/tmp" start \
    > "$LOGS/head.pg_ctl.log" 2>&1 || { tail -n 5 "$host_data/../postgres.log" >&2; die "PostgreSQL did not start"; }
  # The role and database for MLflow; SQL (with the password) goes through stdin, never argv.
  local pw
  pw="$(cat "$SECRETS/pg_password")"
  node_exec head runuser -u postgres -- psql -q -h /tmp -p "$PG_PORT" -d postgres -v ON_ERROR_STOP=1 \
    > /dev/null <<EOF
DO \$\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mlflow') THEN CREATE ROLE mlflow LOGIN; END IF; END \$\$;
ALTER ROLE mlflow PASSWORD '$pw';
SELECT 'CREATE DATABASE mlflow OWNER mlflow' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mlflow')\gexec
EOF
  # libpq reads ~/.pgpass: the MLflow server's URI carries no password.
  (umask 077 && echo "$HEAD:$PG_PORT:mlflow:mlflow:$pw" > "$(node_home head)/.pgpass")
}

start_s3() {
  listening head "$S3_PORT" && { echo "S3 store (moto) already running on http://$HEAD:$S3_PORT"; return 0; }
  echo "starting the S3 store (moto) on http://$HEAD:$S3_PORT"
  node_spawn head moto "$PY" -m moto.server -H "$HEAD" -p "$S3_PORT"
}

start_mlflow() {
  listening head "$MLFLOW_PORT" && { echo "MLflow server already running on http://$HEAD:$MLFLOW_PORT"; return 0; }
  echo "starting the MLflow server on http://$HEAD:$MLFLOW_PORT (Postgres backend, artifacts in s3://linrep-artifacts)"
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false node_spawn head mlflow "$BIN/mlflow" server \
    --host "$HEAD" --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "postgresql+psycopg2://mlflow@$HEAD:$PG_PORT/mlflow" \
    --artifacts-destination "s3://linrep-artifacts/mlflow"
}

start_ray_head() {
  has_process head "gcs_server" && { echo "Ray head already running"; return 0; }
  echo "starting the Ray head: GCS $HEAD:$RAY_PORT, Jobs API http://$HEAD:$DASH_PORT (token auth)"
  ( node_exec head "$BIN/ray" start --head --node-ip-address="$HEAD" --port="$RAY_PORT" \
      --num-cpus=0 --resources='{"bed_head": 1}' --object-store-memory="$OBJECT_STORE_BYTES" \
      --include-dashboard=true --dashboard-host="$HEAD" --dashboard-port="$DASH_PORT" \
      --disable-usage-stats ) >> "$LOGS/head.ray.log" 2>&1 < /dev/null \
    || { tail -n 15 "$LOGS/head.ray.log" >&2; die "ray start --head failed (log: $LOGS/head.ray.log)"; }
}

start_ray_worker() {  # $1 w1|w2
  local node="$1"
  has_process "$node" "raylet" && { echo "Ray worker $node already running"; return 0; }
  echo "starting Ray worker $node on ${IP[$node]} (1 CPU, resource bed_$node)"
  ( node_exec "$node" "$BIN/ray" start --address="$HEAD:$RAY_PORT" --node-ip-address="${IP[$node]}" \
      --num-cpus=1 --resources="{\"bed_$node\": 1}" --object-store-memory="$OBJECT_STORE_BYTES" \
      --disable-usage-stats ) >> "$LOGS/$node.ray.log" 2>&1 < /dev/null \
    || { tail -n 15 "$LOGS/$node.ray.log" >&2; die "ray start on $node failed (log: $LOGS/$node.ray.log)"; }
}

wait_ready() {  # asked from the client node, as a user would
  local why
  # MLflow is watched from the head (whose processes only it sees), the rest asked from the client.
  why=$(node_exec head python "$HERE/bedlib.py" wait-http "http://$HEAD:$MLFLOW_PORT/health" --timeout 120 \
        --watch "mlflow server" 2>&1) \
  && why=$(node_exec client python "$HERE/bedlib.py" wait-http "http://$HEAD:$MLFLOW_PORT/health" --timeout 30 2>&1) \
  && why=$(node_exec client python "$HERE/bedlib.py" wait-http "http://$HEAD:$DASH_PORT/api/jobs/" \
           --token-file /home/root/.ray/auth_token --timeout 120 2>&1) \
  && why=$(node_exec client python "$HERE/bedlib.py" wait-nodes "http://$HEAD:$DASH_PORT" \
           "$HEAD" "${IP[w1]}" "${IP[w2]}" --token-file /home/root/.ray/auth_token --timeout 120 2>&1) \
  && return 0
  echo "bed.sh: not ready: $why" >&2
  local log
  for log in "$LOGS/head.mlflow.log" "$LOGS/head.ray.log"; do
    [[ -f "$log" ]] && { echo "--- last lines of $log" >&2; tail -n 10 "$log" >&2; }
  done
  exit 1
}

write_state() {
  "$PY" - "$BED/bed.json" <<EOF
import json, sys
json.dump({"head": "$HEAD", "w1": "${IP[w1]}", "w2": "${IP[w2]}", "client": "${IP[client]}",
           "namespaces": {n: "$NAME-" + n for n in ("head", "w1", "w2", "client", "br")},
           "gcs": "$HEAD:$RAY_PORT", "dashboard": "http://$HEAD:$DASH_PORT",
           "mlflow": "http://$HEAD:$MLFLOW_PORT", "s3": "http://$HEAD:$S3_PORT",
           "postgres": "$HEAD:$PG_PORT", "buckets": "${BUCKETS[*]}".split(),
           "storage": "$STORAGE", "ports": [$RAY_PORT, $DASH_PORT, $MLFLOW_PORT, $S3_PORT, $PG_PORT]},
          open(sys.argv[1], "w"), indent=1)
EOF
}

print_usage_hint() {
  cat <<EOF
bed up: nodes head $HEAD, w1 ${IP[w1]}, w2 ${IP[w2]}, client ${IP[client]} (namespaces $NAME-*)
  Ray GCS                   $HEAD:$RAY_PORT
  Ray Jobs API + dashboard  http://$HEAD:$DASH_PORT   (token auth)
  MLflow tracking server    http://$HEAD:$MLFLOW_PORT   (PostgreSQL $HEAD:$PG_PORT, artifacts s3://linrep-artifacts)
  S3 store (moto)           http://$HEAD:$S3_PORT    (buckets: ${BUCKETS[*]})
  shared volume             /srv on every node = $SHARED
use it (as a user, from the client node):
  infra/local/bed.sh exec client linrep submit train synthetic-supervised optim.steps=300
  infra/local/bed.sh exec client bash        # a shell there; \`bed.sh env\` shows its environment
stop it:
  infra/local/bed.sh down
EOF
}

cmd_up() {
  need_tools
  mkdir -p "$BED" "$RUN" "$LOGS" "$SHARED"
  chmod 700 "$BED"
  make_secrets
  net_up
  local node
  for node in "${NODES[@]}"; do start_init "$node"; done
  start_postgres
  start_mlflow  # the slowest to come up (imports, migrations on a fresh database): first
  start_s3
  start_ray_head
  # The workers join side by side (each `ray start` takes 10-30 s on 2 cores), while the buckets
  # are made.
  local pids=() p
  for node in "${WORKERS[@]}"; do start_ray_worker "$node" & pids+=($!); done
  node_exec head python "$HERE/bedlib.py" buckets "${BUCKETS[@]}" \
    || die "could not create the S3 buckets (log: $LOGS/head.moto.log)"
  for p in "${pids[@]}"; do wait "$p" || die "a Ray worker did not start"; done
  wait_ready
  write_state
  print_usage_hint
}

stop_node() {  # $1 node: kill its PID namespace; also any process left in its network namespace
  local node="$1" pid
  if pid="$(init_pid "$node")" && init_alive "$node"; then
    if [[ "$node" == head ]] && listening head "$PG_PORT"; then
      # a clean database shutdown (no crash recovery next time); everything else just dies
      node_exec head runuser -u postgres -- "$PG_BIN/pg_ctl" -D /tmp/pgdata -m fast -w -t 20 stop > /dev/null 2>&1 || true
    fi
    echo "node $node: $("${LIB[@]}" kill-ns "$pid")"
  fi
  rm -f "$RUN/$node.pid"
  # Stale state (a killed test, a lost pid file): whatever still uses the node's network namespace.
  if ns_exists "$(ns "$node")"; then
    local left
    left="$(ip netns pids "$(ns "$node")" | xargs)"
    if [[ -n "$left" ]]; then
      echo "node $node: killing leftover processes $left"
      # shellcheck disable=SC2086
      kill -KILL $left 2> /dev/null || true
    fi
  fi
}

cmd_down() {
  need_root
  local node
  for node in client w2 w1 head; do stop_node "$node"; done
  for node in "${NODES[@]}"; do
    ns_exists "$(ns "$node")" && { ip netns del "$(ns "$node")"; echo "deleted namespace $(ns "$node")"; }
  done
  ns_exists "$BR_NS" && { ip netns del "$BR_NS"; echo "deleted namespace $BR_NS"; }
  rm -f "$BED/bed.json"
  if [[ "${1:-}" == "--purge" ]]; then
    [[ -d "$BED/nodes" || -d "$RUN" ]] && rm -rf "$BED"
    echo "down; state purged"
  else
    echo "down (PostgreSQL data and logs kept in $BED; 'down --purge' removes them; S3 objects are gone)"
  fi
}

cmd_status() {
  need_root
  local node up=0 total=0 n
  echo "nodes:"
  for node in "${NODES[@]}"; do
    n="$(ns "$node")"
    total=$((total + 1))
    if ns_exists "$n" && init_alive "$node"; then
      up=$((up + 1)); echo "  $node  up    ${IP[$node]}  namespace $n  init pid $(init_pid "$node")"
    elif ns_exists "$n"; then echo "  $node  down  ${IP[$node]}  namespace $n (no processes)"
    else echo "  $node  down  (no namespace)"; fi
  done
  echo "servers:"
  local svc port ok=0
  for svc in "PostgreSQL:$PG_PORT" "S3 (moto):$S3_PORT" "MLflow:$MLFLOW_PORT" "Ray GCS:$RAY_PORT" "Ray Jobs API:$DASH_PORT"; do
    port="${svc##*:}"
    if init_alive head && listening head "$port"; then echo "  ${svc%:*}  $HEAD:$port  running"; ok=$((ok + 1))
    else echo "  ${svc%:*}  $HEAD:$port  stopped"; fi
  done
  for node in "${WORKERS[@]}"; do
    if init_alive "$node" && has_process "$node" raylet; then echo "  Ray worker $node  ${IP[$node]}  running"; ok=$((ok + 1))
    else echo "  Ray worker $node  ${IP[$node]}  stopped"; fi
  done
  echo "listening sockets:"
  for node in "${NODES[@]}" br; do
    n="$(ns "$node")"
    ns_exists "$n" || continue
    echo "  [$n]"
    ip netns exec "$n" ss -Hltnp | sed 's/^/    /'
  done
  [[ $up == "$total" && $ok == 7 ]] || exit 3
}

cmd_env() {
  need_root
  [[ -d "$SECRETS" ]] || die "not up (no state in $BED)"
  echo "# the environment of the bed's client node (bed.sh exec client ...); addresses reach only bed namespaces"
  (node_env client; for v in $(compgen -e | sort); do
     case "$v" in RAY_*|MLFLOW_*|AWS_*|LINREP_STORAGE|HOME|TMPDIR) printf 'export %s=%q\n' "$v" "${!v}" ;; esac
   done)
}

cmd_kill_node() {  # $1 node
  need_root; need_node "$1"
  local pid
  pid="$(init_pid "$1")" && init_alive "$1" || { echo "node $1 is not running"; return 0; }
  echo "node $1: $("${LIB[@]}" kill-ns "$pid") (its namespace and address stay; bed.sh start-node $1)"
  rm -f "$RUN/$1.pid"
}

cmd_start_node() {  # $1 node
  need_root; need_node "$1"
  [[ "$1" == w1 || "$1" == w2 ]] || die "start-node restarts a worker (w1|w2); for the head use: bed.sh down && bed.sh up"
  init_alive head || die "the head is not running: bed.sh up"
  start_init "$1"
  start_ray_worker "$1"
}

case "${1:-}" in
  up) cmd_up ;;
  down) shift; cmd_down "${1:-}" ;;
  status) cmd_status ;;
  env) cmd_env ;;
  exec) shift; [[ $# -ge 2 ]] || die "usage: bed.sh exec NODE CMD..."; need_root; need_node "$1"; node_exec "$@" ;;
  kill-node) [[ $# == 2 ]] || die "usage: bed.sh kill-node NODE"; cmd_kill_node "$2" ;;
  start-node) [[ $# == 2 ]] || die "usage: bed.sh start-node w1|w2"; cmd_start_node "$2" ;;
  *) echo "usage: $0 up|down [--purge]|status|env|exec NODE CMD...|kill-node NODE|start-node NODE" >&2; exit 2 ;;
esac
