# shellcheck shell=bash
# Throwaway PostgreSQL, Redis and RabbitMQ servers on free loopback ports, for scripts/test.sh and
# bench/run.sh. Source it; the caller defines log() and die() and calls services_stop from
# its EXIT trap. Sets PG_BIN PG_OS_USER PG_BASE PG_DATA PG_PORT,
# REDIS_BIN REDIS_DIR REDIS_PID REDIS_PORT and (start_rabbitmq) RABBIT_DIR RABBIT_PID
# RABBIT_PORT RABBIT_NODE.

PG_BIN="" PG_OS_USER="" PG_BASE="" PG_DATA="" PG_PORT=""
REDIS_BIN="" REDIS_DIR="" REDIS_PID="" REDIS_PORT=""
RABBIT_DIR="" RABBIT_PID="" RABBIT_PORT="" RABBIT_NODE="" RABBIT_EPMD_PID="" RABBIT_EPMD_PORT=""
RABBIT_LIB=/usr/lib/rabbitmq/bin

# Ask the kernel for a currently free TCP port on 127.0.0.1. There is a tiny race between
# closing the socket and the server binding it; acceptable here.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# apt_install PACKAGE [SERVICE]: install a Debian package quietly (its log only on failure)
# and stop the system service its postinst may have started: ours run on their own ports.
apt_install() {
    local apt_log
    apt_log=$(mktemp -t saga-apt.XXXXXX)
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends "$1"; } >"$apt_log" 2>&1; then
        cat "$apt_log" >&2
        rm -f "$apt_log"
        die "could not install $1"
    fi
    rm -f "$apt_log"
    [[ -n "${2:-}" ]] && { service "$2" stop >/dev/null 2>&1 || true; }
    return 0
}

# start_postgres NAME CONF: initdb and start the newest installed PostgreSQL with the extra
# postgresql.conf lines CONF. The settings live in postgresql.conf (not on the command line)
# so that a test can restart the server with a plain `pg_ctl restart -D $PG_DATA`.
start_postgres() {
    local name=$1 conf=$2
    PG_BIN=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    [[ -n "$PG_BIN" && -x "$PG_BIN/postgres" ]] \
        || die "no PostgreSQL server found under /usr/lib/postgresql/*/bin"
    # PostgreSQL refuses to run as root, so run it as an unprivileged user.
    if id -u postgres >/dev/null 2>&1; then
        PG_OS_USER=postgres
    else
        PG_OS_USER=saga-pg
        if ! id -u "$PG_OS_USER" >/dev/null 2>&1; then
            log "creating system user $PG_OS_USER"
            useradd --system --no-create-home --shell /usr/sbin/nologin "$PG_OS_USER"
        fi
    fi
    PG_BASE=$(mktemp -d -t "$name-pg.XXXXXX")
    chown "$PG_OS_USER": "$PG_BASE"
    PG_DATA=$PG_BASE/data
    PG_PORT=$(free_port)
    local log_file=$PG_BASE/postgres.log
    # Run from the temp dir: the pg user may not be able to read the repo dir.
    (cd "$PG_BASE" && runuser -u "$PG_OS_USER" -- "$PG_BIN/initdb" -D "$PG_DATA" \
        -A trust -U saga --encoding UTF8 --no-locale) >"$log_file" 2>&1 \
        || { cat "$log_file" >&2; die "initdb failed"; }
    cat >>"$PG_DATA/postgresql.conf" <<CONF

# --- added by $name ---
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_BASE'
max_connections = 300
$conf
CONF
    # `runuser` stays in the foreground of this background job; services_stop uses pg_ctl.
    (cd "$PG_BASE" && exec runuser -u "$PG_OS_USER" -- "$PG_BIN/postgres" -D "$PG_DATA") \
        </dev/null >>"$log_file" 2>&1 &
    local pg_job=$! deadline=$(( $(date +%s) + 30 ))
    until "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -U saga; do
        if ! kill -0 "$pg_job" 2>/dev/null || (( $(date +%s) >= deadline )); then
            log "PostgreSQL did not become ready; server log:"
            cat "$log_file" >&2
            die "PostgreSQL failed to start"
        fi
        sleep 0.2
    done
}

redis_ping() {
    python3 - "$1" <<'PY' 2>/dev/null
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1)
s.sendall(b"PING\r\n")
sys.exit(0 if s.recv(64).startswith(b"+PONG") else 1)
PY
}

# start_redis NAME: a non-persistent redis-server (installed with apt when missing), so a
# restart empties its queues.
start_redis() {
    local name=$1
    if ! REDIS_BIN=$(command -v redis-server); then
        log "redis-server not found: installing it with apt-get"
        apt_install redis-server redis-server
        REDIS_BIN=$(command -v redis-server) || die "redis-server still not on PATH"
    fi
    REDIS_DIR=$(mktemp -d -t "$name-redis.XXXXXX")
    REDIS_PORT=$(free_port)
    "$REDIS_BIN" --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no \
        --daemonize no --dir "$REDIS_DIR" </dev/null >"$REDIS_DIR/redis.log" 2>&1 &
    REDIS_PID=$!
    local deadline=$(( $(date +%s) + 30 ))
    until redis_ping "$REDIS_PORT"; do
        if ! kill -0 "$REDIS_PID" 2>/dev/null || (( $(date +%s) >= deadline )); then
            log "Redis did not become ready; server log:"
            cat "$REDIS_DIR/redis.log" >&2
            die "Redis failed to start"
        fi
        sleep 0.2
    done
}

amqp_ping() {
    # Ready when the listener answers the AMQP 0-9-1 protocol header with a Connection.Start
    # method frame (type 1); the listener opens at the end of the node's boot.
    python3 - "$1" <<'PY' 2>/dev/null
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2)
s.sendall(b"AMQP\x00\x00\x09\x01")
sys.exit(0 if s.recv(7)[:1] == b"\x01" else 1)
PY
}

# rabbit_env: the environment our node and its CLI tools share (run a CLI tool with
# `runuser -u rabbitmq -- env $(rabbit_env) $RABBIT_LIB/rabbitmqctl ...`). HOME holds the
# Erlang cookie; RABBITMQ_CONF_ENV_FILE keeps /etc/rabbitmq/rabbitmq-env.conf out.
rabbit_env() {
    printf '%s\n' "HOME=$RABBIT_DIR" "ERL_EPMD_PORT=$RABBIT_EPMD_PORT" \
        "ERL_EPMD_ADDRESS=127.0.0.1" "RABBITMQ_NODENAME=$RABBIT_NODE" \
        "RABBITMQ_CONF_ENV_FILE=$RABBIT_DIR/rabbitmq-env.conf"
}

# start_rabbitmq NAME: a throwaway RabbitMQ node (Debian's rabbitmq-server, installed with
# apt when missing) as the rabbitmq user, with its own epmd, on free loopback ports. Its
# default guest/guest user may connect from loopback, the only address it listens on.
start_rabbitmq() {
    local name=$1
    if [[ ! -x "$RABBIT_LIB/rabbitmq-server" ]]; then
        log "rabbitmq-server not found: installing it with apt-get"
        apt_install rabbitmq-server rabbitmq-server
        [[ -x "$RABBIT_LIB/rabbitmq-server" ]] || die "$RABBIT_LIB/rabbitmq-server still missing"
        # The system node the postinst may have started leaves its epmd (port 4369) behind;
        # stop it too, but only when no Erlang node is registered with it any more.
        if epmd -names 2>/dev/null | grep -q '^epmd: up' \
                && ! epmd -names 2>/dev/null | grep -q '^name '; then
            epmd -kill >/dev/null 2>&1 || true
        fi
    fi
    RABBIT_DIR=$(mktemp -d -t "$name-rabbitmq.XXXXXX")
    chown rabbitmq: "$RABBIT_DIR"
    chmod 700 "$RABBIT_DIR"
    RABBIT_PORT=$(free_port)
    RABBIT_EPMD_PORT=$(free_port)
    local dist_port
    dist_port=$(free_port)
    RABBIT_NODE="$name-$(basename "$RABBIT_DIR" | cut -d. -f2)@localhost"
    local log_file=$RABBIT_DIR/startup.log
    # No plugins (the management plugin alone adds seconds to the boot); a small disk
    # threshold so a nearly full /tmp does not block publishers.
    echo '[].' >"$RABBIT_DIR/enabled_plugins"
    cat >"$RABBIT_DIR/rabbitmq.conf" <<CONF
disk_free_limit.absolute = 50MB
log.file.level = info
CONF
    : >"$RABBIT_DIR/rabbitmq-env.conf"
    chown rabbitmq: "$RABBIT_DIR"/*
    # Our own epmd in the foreground, so that its PID is ours to stop (an epmd the node
    # started itself would daemonize and outlive it).
    (cd "$RABBIT_DIR" && exec runuser -u rabbitmq -- epmd -address 127.0.0.1 \
        -port "$RABBIT_EPMD_PORT") </dev/null >"$RABBIT_DIR/epmd.log" 2>&1 &
    RABBIT_EPMD_PID=$!
    # `runuser` stays in the foreground of this background job and passes SIGTERM on to
    # rabbitmq-server's script, which stops the node gracefully.
    # The environment goes after runuser, which resets HOME to the user's.
    # shellcheck disable=SC2046  # one word per line of rabbit_env
    (cd "$RABBIT_DIR" && exec runuser -u rabbitmq -- env $(rabbit_env) \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$RABBIT_PORT" \
        RABBITMQ_DIST_PORT="$dist_port" RABBITMQ_MNESIA_BASE="$RABBIT_DIR/mnesia" \
        RABBITMQ_LOG_BASE="$RABBIT_DIR/log" RABBITMQ_PID_FILE="$RABBIT_DIR/node.pid" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$RABBIT_DIR/enabled_plugins" \
        RABBITMQ_CONFIG_FILE="$RABBIT_DIR/rabbitmq.conf" \
        "$RABBIT_LIB/rabbitmq-server") </dev/null >"$log_file" 2>&1 &
    RABBIT_PID=$!
    local deadline=$(( $(date +%s) + 90 ))
    until amqp_ping "$RABBIT_PORT"; do
        if ! kill -0 "$RABBIT_PID" 2>/dev/null || (( $(date +%s) >= deadline )); then
            log "RabbitMQ did not become ready; startup and node logs:"
            cat "$log_file" "$RABBIT_DIR"/log/*.log >&2 2>/dev/null
            die "RabbitMQ failed to start"
        fi
        sleep 0.2
    done
}

# services_stop: stop what start_* started and remove their folders (safe to call twice).
services_stop() {
    if [[ -n "$REDIS_PID" ]] && kill -0 "$REDIS_PID" 2>/dev/null; then
        log "stopping redis (pid $REDIS_PID)"
        kill "$REDIS_PID" 2>/dev/null
        wait "$REDIS_PID" 2>/dev/null
    fi
    if [[ -n "$PG_DATA" && -f "$PG_DATA/postmaster.pid" ]]; then
        # pg_ctl rather than the PID we launched: a test may have restarted the server.
        log "stopping postgresql"
        if ! runuser -u "$PG_OS_USER" -- "$PG_BIN/pg_ctl" stop -D "$PG_DATA" -m fast -w -t 60 \
                >/dev/null 2>&1; then
            local pid
            pid=$(head -n 1 "$PG_DATA/postmaster.pid" 2>/dev/null)
            [[ "$pid" =~ ^[0-9]+$ ]] && kill -QUIT "$pid" 2>/dev/null
        fi
    fi
    if [[ -n "$RABBIT_PID" ]] && kill -0 "$RABBIT_PID" 2>/dev/null; then
        log "stopping rabbitmq (pid $RABBIT_PID)"
        kill "$RABBIT_PID" 2>/dev/null
        # A graceful stop takes a second or two; past 30 s the node is killed below.
        local tries=150
        while kill -0 "$RABBIT_PID" 2>/dev/null && (( tries-- > 0 )); do sleep 0.2; done
    fi
    if [[ -f "${RABBIT_DIR:-/nonexistent}/node.pid" ]]; then
        # The Erlang VM, should it outlive the script around it or not stop in time.
        local node_pid
        node_pid=$(head -n 1 "$RABBIT_DIR/node.pid" 2>/dev/null)
        # Only if that PID is still an Erlang VM: the file may outlive a clean stop.
        [[ "$node_pid" =~ ^[0-9]+$ && "$(cat "/proc/$node_pid/comm" 2>/dev/null)" == beam* ]] \
            && kill -KILL "$node_pid" 2>/dev/null
    fi
    [[ -n "$RABBIT_PID" ]] && wait "$RABBIT_PID" 2>/dev/null
    if [[ -n "$RABBIT_EPMD_PID" ]] && kill -0 "$RABBIT_EPMD_PID" 2>/dev/null; then
        kill "$RABBIT_EPMD_PID" 2>/dev/null
        wait "$RABBIT_EPMD_PID" 2>/dev/null
    fi
    # Reap background children (the runuser wrapper around postgres).
    wait 2>/dev/null
    [[ -n "$PG_BASE" ]] && rm -rf "$PG_BASE"
    [[ -n "$REDIS_DIR" ]] && rm -rf "$REDIS_DIR"
    [[ -n "$RABBIT_DIR" ]] && rm -rf "$RABBIT_DIR"
    PG_BASE="" PG_DATA="" REDIS_DIR="" REDIS_PID="" RABBIT_DIR="" RABBIT_PID="" RABBIT_EPMD_PID=""
    return 0
}
