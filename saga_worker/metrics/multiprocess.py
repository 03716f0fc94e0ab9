"""prometheus_client's multiprocess mode, made safe for a prefork pool that recycles children.

Every process of a group writes its counters and histograms to its own memory-mapped files
in one directory, named by pid and process start time (`process_identifier`), so a reused
pid never reopens a dead process's file. The serving process sums the files at scrape time
and first folds the files of processes that exited into one archive per type (`compact`),
so totals stay exact and the directory stays small. This module also owns where such a
directory is: a private temporary one per worker, or SAGA_METRICS_DIR, claimed by one
worker at a time.
"""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client import mmap_dict, multiprocess, values
from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

# The multiprocess internals are untyped; these are the documented extension points
# (MultiProcessValue's process_identifier, MultiProcessCollector.merge, the mmap file format).
MmapedDict: Any = mmap_dict.MmapedDict
MultiProcessCollector: Any = multiprocess.MultiProcessCollector
MultiProcessValue: Any = values.MultiProcessValue

#: Private directories are `<tmp>/saga-metrics-<pid of the worker's main process>-<random>`.
PRIVATE_PREFIX = "saga-metrics-"
#: Held (flock) by the worker that serves a SAGA_METRICS_DIR; not a metric file (*.db).
LOCK_FILE = ".served-by-worker.lock"

_identity: tuple[int, str] | None = None


def process_identifier() -> str:
    """`<pid>-<start time>`: unique per process, so a reused pid never reopens a dead file."""
    global _identity
    pid = os.getpid()
    if _identity is None or _identity[0] != pid:
        stat = _proc_stat(pid)
        token = stat[1] if stat is not None else f"t{time.time_ns()}"
        _identity = (pid, f"{pid}-{token}")
    return _identity[1]


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) from /proc, or None when unavailable."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], fields[19]


def _alive(identifier: str) -> bool:
    pid_text, _, token = identifier.partition("-")
    try:
        pid = int(pid_text)
    except ValueError:
        return True  # not one of ours: leave it alone
    stat = _proc_stat(pid)
    if stat is None:
        if os.path.isdir("/proc"):
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    state, start = stat
    # A zombie has written its last value; a different start time is another process.
    return start == token and state not in ("Z", "X")


ARCHIVED_TYPES = ("counter", "histogram")


def compact(path: str) -> int:
    """Fold the files of exited processes into `<type>_archive.db`; returns files removed.

    Counters and histogram buckets are sums, so adding a dead process's values to the
    archive and deleting its file leaves every scraped total unchanged. The caller must
    hold the lock that scrapes of `path` take.
    """
    removed = 0
    for typ in ARCHIVED_TYPES:
        dead = [
            f
            for f in glob.glob(os.path.join(path, f"{typ}_*.db"))
            if not f.endswith("_archive.db") and not _alive(os.path.basename(f)[len(typ) + 1 : -3])
        ]
        if not dead:
            continue
        archive = MmapedDict(os.path.join(path, f"{typ}_archive.db"))
        try:
            for filename in dead:
                for key, value, _timestamp, _pos in MmapedDict.read_all_values_from_file(filename):
                    current, _ = archive.read_value(key)
                    archive.write_value(key, current + value, 0.0)
                # A crash between the write above and this unlink would count the file
                # twice, but only the main process compacts, and its death ends the group
                # (the next start gets a fresh directory).
                os.remove(filename)
                removed += 1
        finally:
            archive.close()
    return removed


class CompactingMultiProcessCollector:
    """MultiProcessCollector that first compacts the files of processes that exited."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            try:
                compact(self.path)
            except Exception:
                log.exception("compacting metric files in %s failed", self.path)
            files = glob.glob(os.path.join(self.path, "*.db"))
            return list(MultiProcessCollector.merge(files, accumulate=True))


def enable_multiprocess(directory: str) -> None:
    """Make every metric value created from now on (in this process and its forks) a file.

    Must run before any labelled value exists and before the pool forks. prometheus_client
    reads PROMETHEUS_MULTIPROC_DIR when a value is created, and `values.ValueClass` is where
    it looks for the value type; setting both here (instead of before importing it) lets
    the Celery app module import this one.
    """
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    values.ValueClass = MultiProcessValue(process_identifier)


def private_directory() -> str:
    """A new directory for this worker's process group only, named after its main process."""
    remove_orphaned_directories()
    return tempfile.mkdtemp(prefix=f"{PRIVATE_PREFIX}{os.getpid()}-")


def claim_directory(path: Path) -> int | None:
    """Create `path` and lock it for this worker: the lock's descriptor, or None if taken.

    One server per directory: two workers serving the same files would each report the
    other's counts (a `sum` in Prometheus would double them), and both would compact them.
    The lock is released when the descriptor closes, at the latest when the process ends.
    """
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def remove_orphaned_directories() -> None:
    """Remove directories left by workers that were killed (SIGKILL skips worker_shutdown)."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{PRIVATE_PREFIX}*-*")):
        pid_text = os.path.basename(path).split("-")[2]
        if not pid_text.isdigit():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass  # alive under another user: not ours to judge
