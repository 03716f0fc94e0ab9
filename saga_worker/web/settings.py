"""The console's own settings (environment variables), beside the engine's."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..config import Settings


@dataclass(frozen=True)
class WebSettings:
    """`SAGA_WEB_USERS_FILE` (default `$SAGA_HOME/web-users.json`), `SAGA_FLOWER_URL`
    (attempts link to their task there), `SAGA_WEB_SECURE_COOKIES` (1: session cookie sent
    over HTTPS only; set it behind TLS)."""

    users_file: Path
    flower_url: str | None = None
    secure_cookies: bool = False

    @classmethod
    def from_env(cls, settings: Settings, environ: Mapping[str, str] | None = None) -> WebSettings:
        env = os.environ if environ is None else environ
        users = env.get("SAGA_WEB_USERS_FILE") or str(settings.home / "web-users.json")
        flower = (env.get("SAGA_FLOWER_URL") or "").strip().rstrip("/") or None
        return cls(
            users_file=Path(users),
            flower_url=flower,
            secure_cookies=env.get("SAGA_WEB_SECURE_COOKIES", "").strip() in ("1", "true", "yes"),
        )
