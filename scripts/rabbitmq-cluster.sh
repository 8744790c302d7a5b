#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this machine, for the cluster tests and for operators
# to try the fleet on several broker nodes (README "Running on a cluster").
#
#   scripts/rabbitmq-cluster.sh up             start the nodes and join them (idempotent)
#   scripts/rabbitmq-cluster.sh down           stop the nodes and remove their directory
#   scripts/rabbitmq-cluster.sh status         the nodes, and the cluster as node 1 sees it
#   scripts/rabbitmq-cluster.sh stop-node N    stop node N (1-3); the others keep serving
#   scripts/rabbitmq-cluster.sh start-node N   start node N again; it rejoins the cluster
#   scripts/rabbitmq-cluster.sh urls           the AMQP_URL list of the nodes
#   scripts/rabbitmq-cluster.sh ctl N ARGS...  rabbitmqctl ARGS on node N
#   scripts/rabbitmq-cluster.sh queues N ARGS... rabbitmq-queues ARGS on node N
#
# It runs the installed rabbitmq-server (Debian's package) as its own nodes, and leaves a
# broker already on this machine alone: other node names (orch-c1@localhost ...), other
# loopback ports (AMQP 5681-5683, distribution 25681-25683, CLI 25690-25720), its own
# directory (ORCH_CLUSTER_DIR, default /var/tmp/orch-rabbit-cluster) holding data, logs,
# config, an empty plugin list and its own Erlang cookie (given with -setcookie, and
# HOME points into the directory, so no ~/.erlang.cookie is read or written). epmd on
# 4369 is shared, as Erlang nodes do. Run it as root or as any user who can write the
# directory.
set -euo pipefail

BASE=${ORCH_CLUSTER_DIR:-/var/tmp/orch-rabbit-cluster}
NODES=3
AMQP_PORT_BASE=${ORCH_CLUSTER_AMQP_PORT_BASE:-5680}    # node N listens on base+N
DIST_PORT_BASE=${ORCH_CLUSTER_DIST_PORT_BASE:-25680}   # node N's Erlang distribution
CTL_PORT_MIN=25690
CTL_PORT_MAX=25720
RMQ_BIN=${RABBITMQ_BIN_DIR:-/usr/lib/rabbitmq/bin}
START_TIMEOUT_S=120

log() { printf 'rabbitmq-cluster: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

node_name() { printf 'orch-c%s@localhost' "$1"; }
node_dir() { printf '%s/node%s' "$BASE" "$1"; }
amqp_port() { echo $((AMQP_PORT_BASE + $1)); }

check_node_number() {
    [[ "${1:-}" =~ ^[1-9][0-9]*$ ]] && [ "$1" -le "$NODES" ] || die "node number must be 1-$NODES (got '${1:-}')"
}

# The environment every RabbitMQ script of node $1 runs in (a subshell sets it).
node_env() {
    local n=$1 dir cookie
    dir=$(node_dir "$n")
    cookie=$(cat "$BASE/cookie")
    export HOME="$BASE/home"
    # Our own (empty) env file instead of /etc/rabbitmq/rabbitmq-env.conf, which names
    # the system broker's node.
    export RABBITMQ_CONF_ENV_FILE="$BASE/rabbitmq-env.conf"
    export RABBITMQ_NODENAME
    RABBITMQ_NODENAME=$(node_name "$n")
    export RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf"
    export RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config"
    export RABBITMQ_ENABLED_PLUGINS_FILE="$BASE/enabled_plugins"
    export RABBITMQ_MNESIA_BASE="$dir/mnesia"
    export RABBITMQ_LOG_BASE="$dir/log"
    export RABBITMQ_PID_FILE="$dir/pid"
    export RABBITMQ_DIST_PORT
    RABBITMQ_DIST_PORT=$((DIST_PORT_BASE + n))
    export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-setcookie $cookie -kernel inet_dist_use_interface {127,0,0,1}"
    export RABBITMQ_CTL_ERL_ARGS="-setcookie $cookie"
    export RABBITMQ_CTL_DIST_PORT_MIN=$CTL_PORT_MIN RABBITMQ_CTL_DIST_PORT_MAX=$CTL_PORT_MAX
    export ERL_EPMD_ADDRESS=127.0.0.1
    unset ERL_FLAGS RABBITMQ_ENV_LOADED
}

ctl() { local n=$1; shift; (node_env "$n"; "$RMQ_BIN/rabbitmqctl" -n "$(node_name "$n")" "$@"); }
queues() { local n=$1; shift; (node_env "$n"; "$RMQ_BIN/rabbitmq-queues" -n "$(node_name "$n")" "$@"); }

prepare_dirs() {
    mkdir -p "$BASE/home"
    chmod 700 "$BASE" "$BASE/home"
    if [ ! -s "$BASE/cookie" ]; then
        # Hex digits: what Erlang accepts in a cookie, and no shell quoting to worry about.
        (umask 077; od -An -N24 -tx1 /dev/urandom | tr -d ' \n' >"$BASE/cookie")
    fi
    [ -f "$BASE/home/.erlang.cookie" ] || (umask 077; cp "$BASE/cookie" "$BASE/home/.erlang.cookie")
    chmod 400 "$BASE/home/.erlang.cookie"
    : >"$BASE/rabbitmq-env.conf"
    echo '[].' >"$BASE/enabled_plugins"
    local n dir
    for n in $(seq 1 $NODES); do
        dir=$(node_dir "$n")
        mkdir -p "$dir/mnesia" "$dir/log"
        cat >"$dir/rabbitmq.conf" <<EOF
listeners.tcp.1 = 127.0.0.1:$(amqp_port "$n")
listeners.ssl = none
log.file.level = warning
log.console = false
# A node that loses sight of the majority pauses rather than serving a split brain.
cluster_partition_handling = pause_minority
EOF
    done
}

node_pid() {
    local file
    file="$(node_dir "$1")/pid"
    [ -s "$file" ] || return 1
    local pid
    pid=$(cat "$file")
    # Only the beam process of this node: a stale pid file may name a reused pid.
    tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx "RABBITMQ_NODENAME=$(node_name "$1")" || return 1
    echo "$pid"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Up = this node's own beam process is alive and its AMQP listener answers (the
# listeners open last in a node's boot). Checked without rabbitmqctl: each run of the
# CLI costs a second or two of CPU, which the booting nodes need on a small machine.
node_running() { node_pid "$1" >/dev/null && port_open "$(amqp_port "$1")"; }

start_node() {
    local n=$1
    if node_running "$n"; then
        return 0
    fi
    log "starting $(node_name "$n") (AMQP 127.0.0.1:$(amqp_port "$n"))"
    (node_env "$n"; cd "$BASE"; "$RMQ_BIN/rabbitmq-server" -detached >>"$(node_dir "$n")/log/startup.log" 2>&1)
}

await_node() {
    local n=$1 deadline=$((SECONDS + START_TIMEOUT_S))
    until port_open "$(amqp_port "$n")"; do
        if [ $SECONDS -ge $deadline ]; then
            tail -n 20 "$(node_dir "$n")/log/"*.log >&2 || true
            die "$(node_name "$n") did not open its AMQP port within ${START_TIMEOUT_S} s; see $(node_dir "$n")/log"
        fi
        sleep 0.2
    done
}

stop_node() {
    local n=$1 pid
    if pid=$(node_pid "$n"); then
        log "stopping $(node_name "$n")"
        # SIGTERM is a clean shutdown for RabbitMQ (as `rabbitmqctl stop`, without the
        # second or two a CLI run costs).
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + 60))
        while kill -0 "$pid" 2>/dev/null; do
            if [ $SECONDS -ge $deadline ]; then
                kill -KILL "$pid" 2>/dev/null || true
                break
            fi
            sleep 0.1
        done
    fi
    rm -f "$(node_dir "$n")/pid"
}

# Quiet when it works; its output when it does not (the CLI prints warnings about
# feature flags on a fresh node's join that are noise).
quietly() {
    local out
    if ! out=$("$@" 2>&1); then
        printf '%s\n' "$out" >&2
        die "failed: $*"
    fi
}

cmd_up() {
    prepare_dirs
    local n members
    for n in $(seq 1 $NODES); do start_node "$n"; done
    for n in $(seq 1 $NODES); do await_node "$n"; done
    members=$(ctl 1 -q cluster_status --formatter json | grep -o '"disk_nodes":\[[^]]*\]')
    for n in $(seq 2 $NODES); do
        case "$members" in *"\"$(node_name "$n")\""*) continue ;; esac
        log "joining $(node_name "$n") to $(node_name 1)"
        # A node whose data names no other cluster joins without a reset (a reset
        # would cost a few seconds per node at every start-up).
        quietly ctl "$n" -q stop_app
        if ! ctl "$n" -q join_cluster "$(node_name 1)" >/dev/null 2>&1; then
            quietly ctl "$n" -q reset
            quietly ctl "$n" -q join_cluster "$(node_name 1)"
        fi
        quietly ctl "$n" -q start_app
    done
    log "up: $(cmd_urls)"
}

cmd_down() {
    local n
    if [ -d "$BASE" ]; then
        for n in $(seq $NODES -1 1); do stop_node "$n" & done
        wait
        rm -rf "$BASE"
    fi
    log "down"
}

cmd_status() {
    [ -d "$BASE" ] || { echo "no cluster (nothing in $BASE)"; return 3; }
    local n any=
    for n in $(seq 1 $NODES); do
        if node_running "$n"; then
            echo "$(node_name "$n"): running, AMQP 127.0.0.1:$(amqp_port "$n"), pid $(node_pid "$n")"
            any=${any:-$n}
        else
            echo "$(node_name "$n"): stopped"
        fi
    done
    [ -n "$any" ] || return 3
    ctl "$any" cluster_status
}

cmd_urls() {
    local n urls=()
    for n in $(seq 1 $NODES); do urls+=("amqp://guest:guest@127.0.0.1:$(amqp_port "$n")/"); done
    (IFS=,; echo "${urls[*]}")
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    urls) cmd_urls ;;
    stop-node) check_node_number "${2:-}"; stop_node "$2" ;;
    start-node) check_node_number "${2:-}"; [ -d "$BASE" ] || die "no cluster: run up first"; start_node "$2"; await_node "$2" ;;
    ctl) check_node_number "${2:-}"; n=$2; shift 2; ctl "$n" "$@" ;;
    queues) check_node_number "${2:-}"; n=$2; shift 2; queues "$n" "$@" ;;
    *) sed -n '2,12p' "$0" >&2; exit 2 ;;
esac
