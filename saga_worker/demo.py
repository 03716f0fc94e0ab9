"""`saga-worker demo`: example sagas on the embedded default, with a real Celery worker.

Three backtests (one completes, one is compensated, one retries a flaky step) and one order
of `order_workflow`: its two checks run in parallel, then it waits for its approval, which
the demo sends through the CLI (`saga-worker signal`), as an operator would."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .client import SagaClient
from .config import Settings
from .store.migrate import upgrade

SCENARIOS: list[tuple[str, str, dict[str, Any]]] = [
    ("demo-complete", "completes", {"strategy_id": 42}),
    (
        "demo-compensate",
        "fails at save_results and is compensated",
        {"strategy_id": 7, "fail_step": "save_results"},
    ),
    (
        "demo-flaky",
        "retries a flaky step, then completes",
        {"strategy_id": 9, "flaky_step": {"step": "run_strategy", "failures": 2}},
    ),
]


#: The order of the demo: it waits for signal `approval`, sent through the CLI. Its
#: `order_ref` is its business key (`saga-worker list --key ORD-0001`).
ORDER = (
    "demo-order",
    "runs two checks in parallel, waits for approval (CLI), books",
    {"amount": 2500, "order_ref": "ORD-0001"},
)
APPROVER = "risk-officer"


def run_demo(echo: Callable[[str], None], keep: bool = False, timeout: float = 90.0) -> bool:
    """Run the scenarios; True when each saga ended in the state it should."""
    home = Path(tempfile.mkdtemp(prefix="saga-demo-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    env.update(SAGA_HOME=str(home), SAGA_IMPORTS="saga_worker.examples")
    settings = Settings.from_env(env)
    echo(f"embedded default: SQLite {settings.database_url}, filesystem broker in {home}/broker")
    client = SagaClient(settings)
    upgrade(client.store.engine)
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "saga_worker.app",
            "worker",
            "--pool",
            "prefork",
            "--concurrency",
            "2",
            "--loglevel",
            "WARNING",
            "--without-mingle",
            "--without-gossip",
        ],
        env=env,
        stdout=subprocess.DEVNULL if not keep else None,
        stderr=subprocess.STDOUT if not keep else None,
        start_new_session=True,
    )
    try:
        echo(f"started a Celery worker (pid {worker.pid}); sending {len(SCENARIOS) + 1} sagas")
        for saga_id, _, context in SCENARIOS:
            client.start(
                "backtest_workflow",
                context,
                saga_id=saga_id,
                user_id="demo",
                ip_address="127.0.0.1",
            )
        client.start("order_workflow", ORDER[2], saga_id=ORDER[0], user_id="demo")
        started = time.monotonic()
        approved = _approve_when_waiting(client, env, echo, timeout)
        final = client.wait_terminal([s[0] for s in (*SCENARIOS, ORDER)], timeout=timeout)
        echo(f"all sagas settled in {time.monotonic() - started:.1f}s\n")
        expected = {
            "demo-complete": "COMPLETED",
            "demo-compensate": "COMPENSATED",
            "demo-flaky": "COMPLETED",
            "demo-order": "COMPLETED",
        }
        ok = approved
        for saga_id, description, _ in (*SCENARIOS, ORDER):
            saga = final[saga_id]
            state = saga.state.value if saga else "MISSING"
            ok &= state == expected[saga_id]
            echo(f"== {saga_id}: {description} -> {state}")
            if saga and saga.error:
                echo(f"   error: {saga.error}")
            for row in client.audit_trail(saga_id):
                step = row["step_name"] or ""
                extra = f" retry={row['retry_count']}" if row["retry_count"] else ""
                duration = f" {row['duration_ms']:.1f}ms" if row["duration_ms"] is not None else ""
                who = f" by {row['user_id']}" if row["event_type"] == "signal_received" else ""
                echo(
                    f"   {row['timestamp']:%H:%M:%S.%f}  {row['event_type']:<22} {step:<16}"
                    f"{row['saga_state_before'] or '-':>12} -> {row['saga_state_after']:<12}"
                    f"{extra}{duration}{who}"
                )
            echo("")
        return ok
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        if keep:
            echo(f"kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


def _approve_when_waiting(
    client: SagaClient, env: dict[str, str], echo: Callable[[str], None], timeout: float
) -> bool:
    """Once the order waits for its approval, send it with `saga-worker signal`."""
    saga_id = ORDER[0]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        saga = client.get(saga_id)
        if saga is not None and saga.waiting_for == "signal:approval":
            break
        if saga is not None and saga.state.is_terminal:
            return False
        time.sleep(0.2)
    else:
        echo(f"{saga_id} never waited for its approval")
        return False
    command = [
        "saga-worker",
        "signal",
        saga_id,
        "approval",
        "--payload",
        '{"approved": true}',
        "--user",
        APPROVER,
    ]
    echo(f"{saga_id} waits for its approval; $ {' '.join(command)}")
    done = subprocess.run(
        [sys.executable, "-c", "from saga_worker.cli import run; run()", *command[1:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        echo(f"saga-worker signal failed ({done.returncode}): {done.stderr.strip()}")
        return False
    return True
