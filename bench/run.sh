#!/usr/bin/env bash
# The benchmark: saga_worker vs a plain Celery chain (the ceiling) vs DBOS (the peer).
#
#   bash bench/run.sh                  # full run (N=2000, 3 repetitions, scale test)
#   bash bench/run.sh --n 200 --reps 1 --scale-sagas 10000 --scale-audit 100000   # smoke
#   bash bench/run.sh --profile        # also py-spy the saga_worker worker during a burst
#   bash bench/run.sh ab base=/tmp/wt-a new=/tmp/wt-b   # A/B of saga_worker checkouts
#   bash bench/run.sh wal base=/tmp/wt-a new=/tmp/wt-b   # WAL per saga by relation, per checkout
#   bash bench/run.sh console          # the web console's pages at 1M sagas / 10M audit rows
#   bash bench/run.sh console --scale-sagas 10000 --scale-audit 100000 --requests 50  # smoke
#   bash bench/run.sh scale            # saga_worker at size: 10k burst, 1k waiting, 100k through
#   bash bench/run.sh scale --small 200 --big 600 --waiting 100 --through 2000 --label scale-smoke
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
# shellcheck source=scripts/services.sh
source scripts/services.sh

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    services_stop
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

start_bench_postgres() {
    # Durable settings (fsync and synchronous_commit on: every commit waits for the WAL
    # flush). Checkpoints are spaced out so that none lands inside a measured window;
    # maintenance_work_mem speeds up the scale test's index builds.
    start_postgres saga-bench "fsync = on
synchronous_commit = on
full_page_writes = on
shared_buffers = 512MB
max_wal_size = 16GB
checkpoint_timeout = 30min
maintenance_work_mem = 1GB"
    export BENCH_DATABASE_URL="postgresql+psycopg://saga@127.0.0.1:$PG_PORT/postgres"
    export BENCH_PG_DATA=$PG_DATA  # the driver reads postmaster.pid to count PostgreSQL CPU
    log "PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PG_PORT (fsync=on)"
}

start_bench_redis() {
    start_redis saga-bench
    export BENCH_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0" BENCH_REDIS_PID=$REDIS_PID
    log "Redis on 127.0.0.1:$REDIS_PORT"
}

[[ -n "${BENCH_DATABASE_URL:-}" ]] || start_bench_postgres
[[ -n "${BENCH_REDIS_URL:-}" ]] || start_bench_redis

if [[ "${1:-}" == ab ]]; then
    shift
    .venv/bin/python -m bench.ab "$@"      # A/B of saga_worker checkouts (bench/ab.py)
elif [[ "${1:-}" == wal ]]; then
    shift
    PG_BIN=${PG_BIN:-$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)} \
        .venv/bin/python -m bench.wal "$@"    # WAL per saga by relation (bench/wal.py)
elif [[ "${1:-}" == console ]]; then
    shift
    .venv/bin/python -m bench.console "$@" # the console's pages at size (bench/console.py)
elif [[ "${1:-}" == scale ]]; then
    shift
    .venv/bin/python -m bench.load "$@"    # saga_worker under load (bench/load.py)
else
    .venv/bin/python -m bench.main "$@"
fi
