#!/usr/bin/env bash
# The project's single test command (also what CI runs via .ci/run).
#
#   bash scripts/test.sh [extra pytest args]
#
# Sets up .venv, starts a throwaway PostgreSQL, Redis and RabbitMQ on free
# loopback ports (unless SAGA_TEST_DATABASE_URL / SAGA_TEST_BROKER_URL /
# SAGA_TEST_AMQP_URL are already set), then runs ruff, mypy and pytest.
# Everything it starts is stopped and removed on exit, and the exit code of
# the failing step is preserved.
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

# shellcheck source=scripts/services.sh
source scripts/services.sh

# --------------------------------------------------------------- cleanup ----

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    services_stop
    log "finished with exit code $rc after $(( $(date +%s) - SCRIPT_START ))s"
    exit "$rc"
}
trap cleanup EXIT
# Turn signals into a normal exit so the EXIT trap runs and cleans up.
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------ virtualenv ----

phase "virtualenv (.venv)"
# shellcheck source=scripts/venv.sh
source scripts/venv.sh
ensure_venv
if [[ -f pyproject.toml ]]; then
    # -q keeps pip silent unless something goes wrong.
    .venv/bin/pip install -q -e '.[dev]'
else
    log "pyproject.toml not found: skipping 'pip install -e .[dev]'"
fi
phase_done

# ------------------------------------------------------------ PostgreSQL ----

start_test_postgres() {
    # Durability off: a test database need not survive a crash of this machine.
    start_postgres saga-test "fsync = off
synchronous_commit = off
full_page_writes = off"
    "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U saga saga_test
    export SAGA_TEST_DATABASE_URL="postgresql+psycopg://saga@127.0.0.1:$PG_PORT/saga_test"
    # What the chaos tests need to restart this server.
    export SAGA_TEST_PG_BIN=$PG_BIN SAGA_TEST_PG_DATA=$PG_DATA
    export SAGA_TEST_PG_USER=$PG_OS_USER SAGA_TEST_PG_PORT=$PG_PORT
    log "  PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') as $PG_OS_USER on 127.0.0.1:$PG_PORT (data: $PG_DATA)"
}

if [[ -n "${SAGA_TEST_DATABASE_URL:-}" ]]; then
    log "SAGA_TEST_DATABASE_URL is set: using the existing database"
else
    phase "starting PostgreSQL"
    start_test_postgres
    phase_done
fi

# ----------------------------------------------------------------- Redis ----

start_test_redis() {
    start_redis saga-test
    export SAGA_TEST_BROKER_URL="redis://127.0.0.1:$REDIS_PORT/0"
    export SAGA_TEST_REDIS_PORT=$REDIS_PORT SAGA_TEST_REDIS_SERVER=$REDIS_BIN
    log "  Redis on 127.0.0.1:$REDIS_PORT (pid $REDIS_PID)"
}

if [[ -n "${SAGA_TEST_BROKER_URL:-}" ]]; then
    log "SAGA_TEST_BROKER_URL is set: using the existing broker"
else
    phase "starting Redis"
    start_test_redis
    phase_done
fi

# -------------------------------------------------------------- RabbitMQ ----

start_test_rabbitmq() {
    start_rabbitmq saga-test
    # guest/guest on the default vhost: RabbitMQ lets guest in from loopback only, and the
    # node listens on 127.0.0.1 alone.
    export SAGA_TEST_AMQP_URL="amqp://guest:guest@127.0.0.1:$RABBIT_PORT//"
    log "  RabbitMQ node $RABBIT_NODE on 127.0.0.1:$RABBIT_PORT (pid $RABBIT_PID, dir $RABBIT_DIR)"
}

if [[ -n "${SAGA_TEST_AMQP_URL:-}" ]]; then
    log "SAGA_TEST_AMQP_URL is set: using the existing RabbitMQ"
else
    phase "starting RabbitMQ"
    start_test_rabbitmq
    phase_done
fi

# ------------------------------------------------------------ Prometheus ----

# promtool checks deploy/prometheus/ and a real Prometheus scrapes a test worker; both come
# from Debian's prometheus package. Its postinst may start a system prometheus (unless a
# policy-rc.d forbids it): stop it, the tests start their own on free loopback ports.
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    phase "installing prometheus (promtool) with apt-get"
    apt_install prometheus prometheus
    command -v promtool >/dev/null 2>&1 || die "promtool still not on PATH"
    phase_done
fi

# amtool checks deploy/alertmanager/alertmanager.yml; it comes with Debian's alertmanager.
if ! command -v amtool >/dev/null 2>&1; then
    phase "installing prometheus-alertmanager (amtool) with apt-get"
    apt_install prometheus-alertmanager prometheus-alertmanager
    command -v amtool >/dev/null 2>&1 || die "amtool still not on PATH"
    phase_done
fi

# libfaketime runs a test worker with its clock ahead (test_recovery's clock-skew test).
if [[ ! -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ]]; then
    phase "installing faketime with apt-get"
    apt_install faketime
    phase_done
fi

# The console's browser tests drive Debian's chromium through Playwright (executable_path):
# no browser download of Playwright's own.
if ! command -v chromium >/dev/null 2>&1; then
    phase "installing chromium with apt-get"
    apt_install chromium
    command -v chromium >/dev/null 2>&1 || die "chromium still not on PATH"
    phase_done
fi

# ----------------------------------------------------------------- checks ---

# The package, its tests and the benchmark: linted and type-checked alike (mypy --strict,
# configured in pyproject.toml).
check_targets=()
for d in saga_worker tests bench; do [[ -d $d ]] && check_targets+=("$d"); done
if (( ${#check_targets[@]} )); then
    phase "ruff check ${check_targets[*]}"
    .venv/bin/ruff check "${check_targets[@]}"
    phase_done
    phase "mypy ${check_targets[*]}"
    .venv/bin/mypy "${check_targets[@]}"
    phase_done
fi

# Every service the tests need was started above: a test that finds one missing fails
# instead of skipping (tests/requirements.py), whether or not CI is set.
export SAGA_TEST_REQUIRE_SERVICES=1

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
