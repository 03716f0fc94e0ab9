#!/usr/bin/env bash
# The project's single test command (also what CI runs via .ci/run).
#
#   bash scripts/test.sh [extra pytest args]
#
# Sets up .venv, starts a throwaway PostgreSQL and Redis on free loopback
# ports (unless SAGA_TEST_DATABASE_URL / SAGA_TEST_BROKER_URL are already
# set), then runs ruff, mypy and pytest. Everything it starts is stopped and
# removed on exit, and the exit code of the failing step is preserved.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO_ROOT=$(pwd)
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

# ---------------------------------------------------------------- helpers ---

SCRIPT_START=$(date +%s)
PHASE_START=$SCRIPT_START

log() { echo "[test.sh] $*" >&2; }
phase() { PHASE_START=$(date +%s); log "$*..."; }
phase_done() { log "  done in $(( $(date +%s) - PHASE_START ))s"; }
die() { log "ERROR: $*"; exit 1; }

# Ask the kernel for a currently free TCP port on 127.0.0.1. There is a tiny
# race between closing the socket and the server binding it; acceptable here.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# --------------------------------------------------------------- cleanup ----

PG_BASE=""      # temp dir holding the PostgreSQL data dir and log
PG_DATA=""
PG_OS_USER=""
PG_BIN=""
REDIS_DIR=""    # temp dir holding redis' working dir and log
REDIS_PID=""

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [[ -n "$REDIS_PID" ]] && kill -0 "$REDIS_PID" 2>/dev/null; then
        log "stopping redis (pid $REDIS_PID)"
        kill "$REDIS_PID" 2>/dev/null
        wait "$REDIS_PID" 2>/dev/null
    fi
    if [[ -n "$PG_DATA" && -f "$PG_DATA/postmaster.pid" ]]; then
        # Use pg_ctl rather than the PID we launched: chaos tests may have
        # restarted the server, and pg_ctl finds it through postmaster.pid.
        log "stopping postgresql"
        if ! runuser -u "$PG_OS_USER" -- "$PG_BIN/pg_ctl" stop -D "$PG_DATA" -m fast -w -t 30 >/dev/null 2>&1; then
            local pid
            pid=$(head -n 1 "$PG_DATA/postmaster.pid" 2>/dev/null)
            [[ "$pid" =~ ^[0-9]+$ ]] && kill -QUIT "$pid" 2>/dev/null
        fi
    fi
    # Reap background children (the runuser wrapper around postgres).
    wait 2>/dev/null
    [[ -n "$PG_BASE" ]] && rm -rf "$PG_BASE"
    [[ -n "$REDIS_DIR" ]] && rm -rf "$REDIS_DIR"
    log "finished with exit code $rc after $(( $(date +%s) - SCRIPT_START ))s"
    exit "$rc"
}
trap cleanup EXIT
# Turn signals into a normal exit so the EXIT trap runs and cleans up.
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------ virtualenv ----

phase "virtualenv (.venv)"
if [[ ! -x .venv/bin/python ]]; then
    if ! python3 -m venv .venv; then
        # Debian's system python needs python3-venv for ensurepip.
        rm -rf .venv
        log "python3 -m venv failed; installing python3-venv"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        python3 -m venv .venv
    fi
fi
if [[ -f pyproject.toml ]]; then
    # -q keeps pip silent unless something goes wrong.
    .venv/bin/pip install -q -e '.[dev]'
else
    log "pyproject.toml not found: skipping 'pip install -e .[dev]'"
fi
phase_done

# ------------------------------------------------------------ PostgreSQL ----

start_postgres() {
    # Newest installed major version, e.g. /usr/lib/postgresql/15/bin.
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

    PG_BASE=$(mktemp -d -t saga-pg.XXXXXX)
    chown "$PG_OS_USER": "$PG_BASE"
    PG_DATA=$PG_BASE/data
    local port log_file=$PG_BASE/postgres.log
    port=$(free_port)

    # Run from the temp dir: the pg user may not be able to read the repo dir.
    (cd "$PG_BASE" && runuser -u "$PG_OS_USER" -- "$PG_BIN/initdb" -D "$PG_DATA" \
        -A trust -U saga --encoding UTF8 --no-locale) >"$log_file" 2>&1 \
        || { cat "$log_file" >&2; die "initdb failed"; }

    # Also record the settings in postgresql.conf, so that a chaos test can
    # restart the server with a plain `pg_ctl start -D $SAGA_TEST_PG_DATA`.
    cat >>"$PG_DATA/postgresql.conf" <<CONF

# --- added by scripts/test.sh ---
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$PG_BASE'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 300
CONF

    # `runuser` stays in the foreground of this background job and forwards
    # signals; we stop the server with pg_ctl in cleanup().
    (cd "$PG_BASE" && exec runuser -u "$PG_OS_USER" -- "$PG_BIN/postgres" -D "$PG_DATA" \
        -k "$PG_BASE" -h 127.0.0.1 -p "$port" \
        -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
        -c max_connections=300) </dev/null >>"$log_file" 2>&1 &
    local pg_job=$!

    local deadline=$(( $(date +%s) + 30 ))
    until "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$port" -U saga; do
        if ! kill -0 "$pg_job" 2>/dev/null || (( $(date +%s) >= deadline )); then
            log "PostgreSQL did not become ready; server log:"
            cat "$log_file" >&2
            die "PostgreSQL failed to start"
        fi
        sleep 0.2
    done

    "$PG_BIN/createdb" -h 127.0.0.1 -p "$port" -U saga saga_test

    export SAGA_TEST_DATABASE_URL="postgresql+psycopg://saga@127.0.0.1:$port/saga_test"
    export SAGA_TEST_PG_BIN=$PG_BIN
    export SAGA_TEST_PG_DATA=$PG_DATA
    export SAGA_TEST_PG_USER=$PG_OS_USER
    export SAGA_TEST_PG_PORT=$port
    log "  PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') as $PG_OS_USER on 127.0.0.1:$port (data: $PG_DATA)"
}

if [[ -n "${SAGA_TEST_DATABASE_URL:-}" ]]; then
    log "SAGA_TEST_DATABASE_URL is set: using the existing database"
else
    phase "starting PostgreSQL"
    start_postgres
    phase_done
fi

# ----------------------------------------------------------------- Redis ----

redis_ping() {
    if command -v redis-cli >/dev/null 2>&1; then
        [[ "$(redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null)" == PONG ]]
    else
        python3 - "$1" <<'PY' 2>/dev/null
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1)
s.sendall(b"PING\r\n")
sys.exit(0 if s.recv(64).startswith(b"+PONG") else 1)
PY
    fi
}

start_redis() {
    local redis_bin
    if ! redis_bin=$(command -v redis-server); then
        log "redis-server not found: installing it with apt-get"
        local apt_log
        apt_log=$(mktemp -t saga-apt.XXXXXX)
        if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -qq redis-server; } >"$apt_log" 2>&1; then
            cat "$apt_log" >&2
            rm -f "$apt_log"
            die "could not install redis-server"
        fi
        rm -f "$apt_log"
        # The package's postinst may start a system redis on 6379 (not in
        # containers with a policy-rc.d that forbids it). Stop it so that we
        # leave nothing running; ours uses its own port anyway.
        service redis-server stop >/dev/null 2>&1 || true
        redis_bin=$(command -v redis-server) || die "redis-server still not on PATH"
    fi

    REDIS_DIR=$(mktemp -d -t saga-redis.XXXXXX)
    local port
    port=$(free_port)
    "$redis_bin" --bind 127.0.0.1 --port "$port" --save '' --appendonly no \
        --daemonize no --dir "$REDIS_DIR" </dev/null >"$REDIS_DIR/redis.log" 2>&1 &
    REDIS_PID=$!

    local deadline=$(( $(date +%s) + 30 ))
    until redis_ping "$port"; do
        if ! kill -0 "$REDIS_PID" 2>/dev/null || (( $(date +%s) >= deadline )); then
            log "Redis did not become ready; server log:"
            cat "$REDIS_DIR/redis.log" >&2
            die "Redis failed to start"
        fi
        sleep 0.2
    done

    export SAGA_TEST_BROKER_URL="redis://127.0.0.1:$port/0"
    export SAGA_TEST_REDIS_PORT=$port
    export SAGA_TEST_REDIS_SERVER=$redis_bin
    log "  Redis on 127.0.0.1:$port (pid $REDIS_PID)"
}

if [[ -n "${SAGA_TEST_BROKER_URL:-}" ]]; then
    log "SAGA_TEST_BROKER_URL is set: using the existing broker"
else
    phase "starting Redis"
    start_redis
    phase_done
fi

# ------------------------------------------------------------ Prometheus ----

# promtool checks deploy/prometheus/ and a real Prometheus scrapes a test worker; both come
# from Debian's prometheus package. Its postinst may start a system prometheus (unless a
# policy-rc.d forbids it): stop it, the tests start their own on free loopback ports.
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    phase "installing prometheus (promtool) with apt-get"
    apt_log=$(mktemp -t saga-apt.XXXXXX)
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends prometheus; } >"$apt_log" 2>&1; then
        cat "$apt_log" >&2
        rm -f "$apt_log"
        die "could not install prometheus"
    fi
    rm -f "$apt_log"
    service prometheus stop >/dev/null 2>&1 || true
    command -v promtool >/dev/null 2>&1 || die "promtool still not on PATH"
    phase_done
fi

# ----------------------------------------------------------------- checks ---

lint_targets=()
for d in saga_worker tests; do [[ -d $d ]] && lint_targets+=("$d"); done
if (( ${#lint_targets[@]} )); then
    phase "ruff check ${lint_targets[*]}"
    .venv/bin/ruff check "${lint_targets[@]}"
    phase_done
fi

if [[ -d saga_worker ]]; then
    phase "mypy saga_worker"
    .venv/bin/mypy saga_worker
    phase_done
fi

phase "pytest $*"
rc=0
.venv/bin/python -m pytest "$@" || rc=$?
if (( rc == 5 )); then
    die "pytest collected no tests (exit 5); treating that as a failure"
elif (( rc != 0 )); then
    log "pytest failed with exit code $rc"
    exit "$rc"
fi
phase_done
log "all checks passed in $(( $(date +%s) - SCRIPT_START ))s (repo: $REPO_ROOT)"
