"""Settings from SAGA_* environment variables, with embedded defaults when unset."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .core.decision import Limits
from .errors import ConfigurationError

#: Compared without case or separators (audit/redaction.normalise_key): `api_key` also covers
#: `api-key`, `X-Api-Key` and `apiKey`; a key containing one of these is sensitive.
DEFAULT_REDACT_KEYS = (
    "password",
    "passwd",
    "pwd",
    "secret",
    "token",
    "api_key",
    "authorization",
    "credential",
    "private_key",
    "card_number",
    "cvv",
    "iban",
)


def default_home() -> Path:
    """Where the embedded default keeps its SQLite file and broker folders."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "saga_worker"


@dataclass(frozen=True)
class Settings:
    """Every knob of docs/contract.md (Environment variables); build with `Settings.from_env()`."""

    database_url: str
    broker_url: str
    home: Path
    imports: tuple[str, ...] = ()
    queue: str = "saga"
    celery_config: str | None = None
    metrics_port: int | None = None
    metrics_dir: Path | None = None
    recovery_interval_seconds: float = 10.0
    #: Period of the beat's audit anchor (`saga.anchor`); None: no anchors on a schedule.
    anchor_interval_seconds: float | None = 3600.0
    stall_grace_seconds: float = 30.0
    default_step_timeout_seconds: float = 300.0
    max_context_bytes: int = 262_144
    max_context_depth: int = 32
    signing_key: str | None = None
    redact_keys: tuple[str, ...] = DEFAULT_REDACT_KEYS
    max_recoveries: int = 5

    @property
    def is_embedded_broker(self) -> bool:
        return self.broker_url.startswith("filesystem://")

    def limits(self) -> Limits:
        """The settings the pure state machine needs."""
        return Limits(
            stall_grace_seconds=self.stall_grace_seconds,
            max_recoveries=self.max_recoveries,
            default_step_timeout_seconds=self.default_step_timeout_seconds,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        home = Path(env.get("SAGA_HOME") or default_home())
        extra_redact = tuple(
            k.strip().lower() for k in env.get("SAGA_REDACT_KEYS", "").split(",") if k.strip()
        )
        return cls(
            database_url=_database_url(env.get("SAGA_DATABASE_URL"))
            or f"sqlite:///{home / 'saga.sqlite3'}",
            broker_url=env.get("SAGA_BROKER_URL") or "filesystem://",
            home=home,
            imports=tuple(m.strip() for m in env.get("SAGA_IMPORTS", "").split(",") if m.strip()),
            queue=env.get("SAGA_QUEUE") or "saga",
            celery_config=env.get("SAGA_CELERY_CONFIG", "").strip() or None,
            metrics_port=_int(env, "SAGA_METRICS_PORT", None, minimum=0),
            metrics_dir=_metrics_dir(env),
            recovery_interval_seconds=_float(env, "SAGA_RECOVERY_INTERVAL_SECONDS", 10.0),
            anchor_interval_seconds=_float_or_off(env, "SAGA_ANCHOR_INTERVAL_SECONDS", 3600.0),
            stall_grace_seconds=_stall_grace(env),
            default_step_timeout_seconds=_float(env, "SAGA_DEFAULT_STEP_TIMEOUT_SECONDS", 300.0),
            max_context_bytes=_int(env, "SAGA_MAX_CONTEXT_BYTES", 262_144, minimum=2) or 262_144,
            max_context_depth=_int(env, "SAGA_MAX_CONTEXT_DEPTH", 32, minimum=1) or 32,
            signing_key=_signing_key(env),
            redact_keys=DEFAULT_REDACT_KEYS + extra_redact,
            max_recoveries=_int(
                env, "SAGA_MAX_RECOVERIES", 5, minimum=0, maximum=MAX_RECOVERIES_LIMIT
            )
            or 0,
        )


#: Upper bound of SAGA_MAX_RECOVERIES: each re-send of a lost message waits out its queue
#: allowance (doubled per re-send up to an hour) and the step timeout, so more re-sends than
#: this only keep a saga that cannot run waiting for days before it compensates.
MAX_RECOVERIES_LIMIT = 100


SUPPORTED_DATABASES = ("postgresql", "sqlite")
_DATABASE_EXAMPLES = (
    "postgresql+psycopg://user:password@host:5432/db or sqlite:////path/saga.sqlite3"
)


def _database_url(raw: str | None) -> str | None:
    """SAGA_DATABASE_URL checked up front, so a typo is one line naming the variable and not a
    driver traceback at the first query. Messages never repeat the URL: it holds a password."""
    if raw is None or raw.strip() == "":
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(raw)
    except ArgumentError:
        raise ConfigurationError(
            f"SAGA_DATABASE_URL is not a database URL; use {_DATABASE_EXAMPLES}"
        ) from None
    except ValueError:
        # make_url's int() of the port; its message would not name the variable.
        raise ConfigurationError(
            f"SAGA_DATABASE_URL has a port that is not a number; use {_DATABASE_EXAMPLES}"
        ) from None
    if url.get_backend_name() not in SUPPORTED_DATABASES:
        raise ConfigurationError(
            f"SAGA_DATABASE_URL names database {url.drivername!r}, which saga_worker does not "
            f"support; use {_DATABASE_EXAMPLES}"
        )
    try:
        url.get_dialect().import_dbapi()
    except (ArgumentError, ImportError) as exc:
        raise ConfigurationError(
            f"SAGA_DATABASE_URL names driver {url.drivername!r}, which is not installed "
            f"({exc}); use {_DATABASE_EXAMPLES}"
        ) from None
    return raw


def check_broker_url(url: str) -> None:
    """SAGA_BROKER_URL names a transport kombu knows (redis, rediss, amqp, sentinel, ...)."""
    from kombu.transport import resolve_transport

    scheme = url.split("://", 1)[0] if "://" in url else url
    try:
        resolve_transport(scheme)
    except (KeyError, ImportError) as exc:
        # str(KeyError) is the repr of its message: show the message itself.
        reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise ConfigurationError(
            f"SAGA_BROKER_URL uses transport {scheme!r}, which cannot be loaded ({reason}); use "
            "redis://host:6379/0, rediss://..., amqp://user:password@host:5672// or leave it "
            "unset for the embedded broker"
        ) from None


def _signing_key(env: Mapping[str, str]) -> str | None:
    """SAGA_SIGNING_KEY, or the contents of SAGA_SIGNING_KEY_FILE (one of the two)."""
    key, path = env.get("SAGA_SIGNING_KEY") or None, env.get("SAGA_SIGNING_KEY_FILE") or None
    if key and path:
        raise ConfigurationError("set SAGA_SIGNING_KEY or SAGA_SIGNING_KEY_FILE, not both")
    if path is None:
        # Surrounding whitespace is how a key was pasted, not part of it: stripped here as
        # from the file, so one secret gives one key whichever way it is passed.
        return None if key is None else _long_enough(key.strip(), "SAGA_SIGNING_KEY")
    try:
        # A trailing newline is what `echo KEY > file` leaves, not part of the key.
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(
            f"SAGA_SIGNING_KEY_FILE={path!r} cannot be read ({exc}); "
            "point it at a UTF-8 file readable by this process"
        ) from None
    if not text:
        raise ConfigurationError(f"SAGA_SIGNING_KEY_FILE={path!r} is empty")
    return _long_enough(text, f"SAGA_SIGNING_KEY_FILE={path!r}")


#: Shortest signing key accepted, in UTF-8 bytes (DESIGN section 6).
MIN_SIGNING_KEY_BYTES = 32


def _long_enough(key: str, source: str) -> str:
    size = len(key.encode("utf-8"))
    if size < MIN_SIGNING_KEY_BYTES:
        raise ConfigurationError(
            f"{source}: the signing key must be at least {MIN_SIGNING_KEY_BYTES} bytes, got "
            f"{size}; make one with python3 -c 'import secrets; print(secrets.token_hex(32))'"
        )
    return key


def _metrics_dir(env: Mapping[str, str]) -> Path | None:
    """SAGA_METRICS_DIR, absolute: the worker and the CLI must name the same directory from
    whatever working directory each starts in."""
    raw = env.get("SAGA_METRICS_DIR", "").strip()
    if not raw:
        return None
    path = Path(raw)
    if not path.is_absolute():
        raise ConfigurationError(f"SAGA_METRICS_DIR must be an absolute path, got {raw!r}")
    return path


def _int(
    env: Mapping[str, str],
    name: str,
    default: int | None,
    *,
    minimum: int,
    maximum: int | None = None,
) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigurationError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigurationError(f"{name} must be <= {maximum}, got {value}")
    return value


#: Shortest SAGA_STALL_GRACE_SECONDS: on amqp:// a retry's countdown is rounded up to whole
#: seconds, so its message may be delivered up to 1 s after it is due; its `expires` (due time
#: + the allowance) must not come before that.
MIN_STALL_GRACE_SECONDS = 1.0


def _stall_grace(env: Mapping[str, str]) -> float:
    name = "SAGA_STALL_GRACE_SECONDS"
    value = _float(env, name, 30.0)
    if value < MIN_STALL_GRACE_SECONDS:
        raise ConfigurationError(
            f"{name} must be >= {MIN_STALL_GRACE_SECONDS:g} second, got {env[name]!r}: a step "
            "message expires that long after it is due, and a broker countdown is rounded up "
            "to whole seconds on RabbitMQ, so a shorter grace can expire a retry unstarted"
        )
    return value


def _float_or_off(env: Mapping[str, str], name: str, default: float) -> float | None:
    """A period in seconds, or None for "off" (0 or `off`)."""
    raw = (env.get(name) or "").strip().lower()
    if raw in ("0", "off"):
        return None
    return _float(env, name, default)


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ConfigurationError(f"{name} must be > 0, got {raw!r}")
    return value
