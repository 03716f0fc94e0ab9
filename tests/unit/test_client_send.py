"""What `saga-worker start` puts on the broker: the real kwargs, shown redacted."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from saga_worker.client import SagaClient
from saga_worker.config import Settings


def test_start_messages_show_their_context_redacted(tmp_path: Path) -> None:
    settings = Settings.from_env({"SAGA_HOME": str(tmp_path)})
    client = SagaClient(settings)
    saga_id = client.start(
        "backtest_workflow", {"password": "hunter2", "card": "4111111111111111", "n": 7}
    )
    (message_file,) = (tmp_path / "broker" / "queue").iterdir()
    envelope = json.loads(message_file.read_text())
    shown = envelope["headers"]["kwargsrepr"]
    # Task events and Flower show kwargsrepr: no secret may be in it.
    assert "hunter2" not in shown and "4111111111111111" not in shown, shown
    assert saga_id in shown and "'n': 7" in shown
    # The worker still gets the real context.
    body = json.loads(base64.b64decode(envelope["body"]))
    assert body[1]["context"]["password"] == "hunter2"
