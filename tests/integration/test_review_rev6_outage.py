"""Review of issue 14, item 6: a worker outage a little longer than the queue allowance.

Step messages now expire at their start-by time (send + SAGA_STALL_GRACE_SECONDS). A copy
that expired is known never to have started, yet nothing acts on that: the attempt waits for
its deadline (start-by + the step's timeout) and the sweep. So every step message sent while
the workers are down for longer than the grace (a deploy, a restart, a broker failover) costs
its saga a full step timeout (300 s by default) plus a recovery, where before this change the
message simply ran when a worker came back.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from celery import Celery

from saga_worker.config import Settings
from saga_worker.worker.dispatch import CeleryDispatcher

from .conftest import SIGNING_KEY, fresh_postgres_database
from .processes import Rig, unique
from .test_recovery import engine_for, recovered_rows, start_in_process

pytestmark = pytest.mark.integration

GRACE = "3"  # the queue allowance of a first send
OUTAGE_SECONDS = 5.0  # the workers are down this long: a little longer than the grace


@pytest.fixture
def outage_rig(pg_admin_url: str, broker_url: str, tmp_path: Path) -> Iterator[Rig]:
    rig = Rig.create(
        fresh_postgres_database(pg_admin_url),
        broker_url,
        tmp_path,
        SAGA_STALL_GRACE_SECONDS=GRACE,
        SAGA_RECOVERY_INTERVAL_SECONDS="0.5",
        REC_DEAD_QUEUE=unique("rec-dead"),
        REC_REMOTE_QUEUE=unique("rec-remote"),
    )
    try:
        yield rig
    finally:
        rig.close()


def test_steps_sent_during_a_short_worker_outage_run_when_the_workers_return(
    outage_rig: Rig,
) -> None:
    rig = outage_rig
    producer = Celery("rev6-dispatch", broker=rig.env["SAGA_BROKER_URL"], set_as_current=False)
    producer.conf.update(task_serializer="json", accept_content=["json"])
    dispatcher = CeleryDispatcher(producer, Settings.from_env(rig.env), SIGNING_KEY)
    try:
        # rec_quick: two instant steps with a 10 s timeout; the first step's messages are
        # sent now, on the real clock, while no worker runs.
        engine = engine_for(rig, dispatcher, clock_offset=timedelta(0))
        saga_ids = start_in_process(engine, "rec_quick", 10)
    finally:
        producer.close()
    time.sleep(OUTAGE_SECONDS)  # the workers restart (a deploy)
    back = time.monotonic()
    rig.start_worker()
    rig.start_beat()
    sagas = rig.wait_all(saga_ids, timeout=60)
    took = time.monotonic() - back
    assert {s.state.value for s in sagas.values()} == {"COMPLETED"}
    recovered = {s: len(rows) for s, rows in recovered_rows(rig, saga_ids).items() if rows}
    assert took < 5.0 and not recovered, (
        f"{OUTAGE_SECONDS:.0f} s without workers (grace {GRACE} s) cost {took:.1f} s after they "
        f"came back, for two instant steps: every queued first step expired unstarted and "
        f"waited for its deadline (start-by + 10 s timeout) and a recovery ({recovered})"
    )
