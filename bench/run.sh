#!/usr/bin/env bash
# The benchmark: saga_worker vs a plain Celery chain (the ceiling) vs DBOS (the peer).
#
#   bash bench/run.sh                  # full run (N=2000, 3 repetitions, scale test)
#   bash bench/run.sh --n 200 --reps 1 --scale-sagas 10000 --scale-audit 100000   # smoke
#   bash bench/run.sh --profile        # also py-spy the saga_worker worker during a burst
#   bash bench/run.sh ab base=/tmp/wt-a new=/tmp/wt-b   # A/B of saga_worker checkouts
#
# Creates/uses .venv, installs the project with its `bench` extra, starts a throwaway
# PostgreSQL (fsync=on, synchronous_commit=on, as the unprivileged `postgres` user, like
# scripts/test.sh) and Redis on free loopback ports, runs `python -m bench.main` with the
# given arguments, and stops both servers. Results: bench/results/ (JSON, PNG, logs).
# Set BENCH_DATABASE_URL / BENCH_REDIS_URL to use servers that already run instead.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

log() { echo "[bench] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

PG_BASE="" PG_DATA="" PG_OS_USER="" PG_BIN="" REDIS_DIR="" REDIS_PID=""

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [[ -n "$REDIS_PID" ]] && kill -0 "$REDIS_PID" 2>/dev/null; then
        kill "$REDIS_PID" 2>/dev/null
        wait "$REDIS_PID" 2>/dev/null
    fi
    if [[ -n "$PG_DATA" && -f "$PG_DATA/postmaster.pid" ]]; then
        if ! runuser -u "$PG_OS_USER" -- "$PG_BIN/pg_ctl" stop -D "$PG_DATA" -m fast -w -t 60 \
                >/dev/null 2>&1; then
            local pid
            pid=$(head -n 1 "$PG_DATA/postmaster.pid" 2>/dev/null)
            [[ "$pid" =~ ^[0-9]+$ ]] && kill -QUIT "$pid" 2>/dev/null
        fi
    fi
    wait 2>/dev/null
    [[ -n "$PG_BASE" ]] && rm -rf "$PG_BASE"
    [[ -n "$REDIS_DIR" ]] && rm -rf "$REDIS_DIR"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------ virtualenv ----

if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv || {
        rm -rf .venv
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        python3 -m venv .venv
    }
fi
if grep -q '^bench = \[' pyproject.toml; then
    .venv/bin/pip install -q -e '.[bench]'
else
    # The `bench` extra is not in this checkout's pyproject.toml: install the same packages.
    .venv/bin/pip install -q -e . 'dbos>=3.4,<4' 'matplotlib>=3.8' 'py-spy>=0.3.14'
fi

# ------------------------------------------------------------ PostgreSQL ----

start_postgres() {
    PG_BIN=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    [[ -n "$PG_BIN" && -x "$PG_BIN/postgres" ]] \
        || die "no PostgreSQL server found under /usr/lib/postgresql/*/bin"
    # PostgreSQL refuses to run as root, so run it as an unprivileged user.
    if id -u postgres >/dev/null 2>&1; then
        PG_OS_USER=postgres
    else
        PG_OS_USER=saga-pg
        id -u "$PG_OS_USER" >/dev/null 2>&1 \
            || useradd --system --no-create-home --shell /usr/sbin/nologin "$PG_OS_USER"
    fi
    PG_BASE=$(mktemp -d -t saga-bench-pg.XXXXXX)
    chown "$PG_OS_USER": "$PG_BASE"
    PG_DATA=$PG_BASE/data
    local port log_file=$PG_BASE/postgres.log
    port=$(free_port)
    (cd "$PG_BASE" && runuser -u "$PG_OS_USER" -- "$PG_BIN/initdb" -D "$PG_DATA" \
        -A trust -U saga --encoding UTF8 --no-locale) >"$log_file" 2>&1 \
        || { cat "$log_file" >&2; die "initdb failed"; }
    # Durable settings (fsync and synchronous_commit on: every commit waits for the WAL
    # flush). Checkpoints are spaced out so that none lands inside a measured window;
    # maintenance_work_mem speeds up the scale test's index builds.
    cat >>"$PG_DATA/postgresql.conf" <<CONF

# --- added by bench/run.sh ---
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$PG_BASE'
fsync = on
synchronous_commit = on
full_page_writes = on
max_connections = 300
shared_buffers = 512MB
max_wal_size = 16GB
checkpoint_timeout = 30min
maintenance_work_mem = 1GB
CONF
    (cd "$PG_BASE" && exec runuser -u "$PG_OS_USER" -- "$PG_BIN/postgres" -D "$PG_DATA") \
        </dev/null >>"$log_file" 2>&1 &
    local pg_job=$! deadline=$(( $(date +%s) + 30 ))
    until "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$port" -U saga; do
        if ! kill -0 "$pg_job" 2>/dev/null || (( $(date +%s) >= deadline )); then
            cat "$log_file" >&2
            die "PostgreSQL failed to start"
        fi
        sleep 0.2
    done
    export BENCH_DATABASE_URL="postgresql+psycopg://saga@127.0.0.1:$port/postgres"
    export BENCH_PG_DATA=$PG_DATA  # the driver reads postmaster.pid to count PostgreSQL CPU
    log "PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$port (fsync=on)"
}

# ----------------------------------------------------------------- Redis ----

start_redis() {
    local redis_bin port
    if ! redis_bin=$(command -v redis-server); then
        log "redis-server not found: installing it with apt-get"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq redis-server; } >/dev/null 2>&1 \
            || die "could not install redis-server"
        service redis-server stop >/dev/null 2>&1 || true
        redis_bin=$(command -v redis-server) || die "redis-server still not on PATH"
    fi
    REDIS_DIR=$(mktemp -d -t saga-bench-redis.XXXXXX)
    port=$(free_port)
    "$redis_bin" --bind 127.0.0.1 --port "$port" --save '' --appendonly no \
        --daemonize no --dir "$REDIS_DIR" </dev/null >"$REDIS_DIR/redis.log" 2>&1 &
    REDIS_PID=$!
    local deadline=$(( $(date +%s) + 30 ))
    until .venv/bin/python -c "import redis, sys; redis.Redis(port=$port).ping()" 2>/dev/null; do
        if ! kill -0 "$REDIS_PID" 2>/dev/null || (( $(date +%s) >= deadline )); then
            cat "$REDIS_DIR/redis.log" >&2
            die "Redis failed to start"
        fi
        sleep 0.2
    done
    export BENCH_REDIS_URL="redis://127.0.0.1:$port/0" BENCH_REDIS_PID=$REDIS_PID
    log "Redis on 127.0.0.1:$port"
}

[[ -n "${BENCH_DATABASE_URL:-}" ]] || start_postgres
[[ -n "${BENCH_REDIS_URL:-}" ]] || start_redis

if [[ "${1:-}" == ab ]]; then
    shift
    .venv/bin/python -m bench.ab "$@"      # A/B of saga_worker checkouts (bench/ab.py)
else
    .venv/bin/python -m bench.main "$@"
fi
