"""What a run leaves behind: the worker's resident memory and the bytes per saga on disk.

Used by bench/load.py. RSS comes from /proc (Linux); sizes and tuple counters from
PostgreSQL's catalog functions and pg_stat_user_tables.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg

from .common import pg_dsn

TABLES = ("saga_checkpoints", "saga_audit_logs")


def rss_kb(pid: int) -> int | None:
    """VmRSS of a process in KiB; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def children(pid: int) -> list[int]:
    """Direct children of a process: a prefork worker's pool processes."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if ppid == pid:
            found.append(int(entry.name))
    return sorted(found)


@dataclass
class RssSample:
    """The worker's main process and pool children at one moment (KiB)."""

    done: int  # sagas finished through the worker when sampled
    main_kb: int
    children_kb: dict[int, int]

    @property
    def total_kb(self) -> int:
        return self.main_kb + sum(self.children_kb.values())


@dataclass
class RssSeries:
    """Samples of one worker; notices pool children replaced (max_tasks_per_child etc.)."""

    main_pid: int
    samples: list[RssSample] = field(default_factory=list)

    def sample(self, done: int) -> RssSample:
        kids = {pid: rss_kb(pid) for pid in children(self.main_pid)}
        taken = RssSample(
            done, rss_kb(self.main_pid) or 0, {p: kb for p, kb in kids.items() if kb is not None}
        )
        self.samples.append(taken)
        return taken

    def summary(self) -> dict[str, Any]:
        """Baseline (first sample), final, max and growth of the total, main and children."""
        if not self.samples:
            return {}
        first, last = self.samples[0], self.samples[-1]
        seen = {pid for s in self.samples for pid in s.children_kb}
        return {
            "total": _growth([s.total_kb for s in self.samples]),
            "main": _growth([s.main_kb for s in self.samples]),
            "children": _growth([sum(s.children_kb.values()) for s in self.samples]),
            "child_pids_first": sorted(first.children_kb),
            "child_pids_last": sorted(last.children_kb),
            # More pids than children at any one time: the pool replaced some.
            "children_replaced": len(seen) - len(first.children_kb),
            "samples": [
                {"done": s.done, "main_kb": s.main_kb, "children_kb": s.children_kb}
                for s in self.samples
            ],
        }


def _growth(values: list[int]) -> dict[str, float]:
    base, final = values[0], values[-1]
    return {
        "baseline_kb": base,
        "final_kb": final,
        "max_kb": max(values),
        "growth_pct": 100 * (final - base) / base if base else float("nan"),
        "max_growth_pct": 100 * (max(values) - base) / base if base else float("nan"),
    }


def disk_per_saga(url: str, settle_timeout: float = 15) -> dict[str, Any]:
    """Table, index and TOAST bytes per saga of the two saga tables, and the HOT ratio.

    Run after the worker stopped: its backends flushed their statistics when they exited.
    The counters are still read only once n_tup_ins of the checkpoints matches their rows.
    """
    with psycopg.connect(pg_dsn(url), autocommit=True) as conn:
        sagas = _one(conn, "SELECT count(*) FROM saga_checkpoints")
        by_type = {
            f"{t}/{s}": int(n)
            for t, s, n in conn.execute(
                "SELECT saga_type, state, count(*) FROM saga_checkpoints"
                " GROUP BY 1, 2 ORDER BY 1, 2"
            )
        }
        audit_rows = _one(conn, "SELECT count(*) FROM saga_audit_logs")
        deadline = time.monotonic() + settle_timeout
        while True:
            _flush_stats(conn)
            inserted = _one(
                conn,
                "SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = 'saga_checkpoints'",
            )
            if inserted >= sagas or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        tables = {name: _table(conn, name, sagas) for name in TABLES}
    return {
        "sagas": sagas,
        "sagas_by_type_state": by_type,
        "audit_rows": audit_rows,
        "audit_rows_per_saga": audit_rows / sagas if sagas else float("nan"),
        "stats_current": inserted >= sagas,
        "tables": tables,
    }


def _flush_stats(conn: psycopg.Connection[Any]) -> None:
    # Flushes this backend's pending counters only (PostgreSQL 15+); others flush on exit.
    with contextlib.suppress(psycopg.errors.UndefinedFunction):
        conn.execute("SELECT pg_stat_force_next_flush()")


def _one(conn: psycopg.Connection[Any], sql: str, *args: Any) -> int:
    row = conn.execute(sql, args or None).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def _table(conn: psycopg.Connection[Any], name: str, sagas: int) -> dict[str, Any]:
    row = conn.execute(
        "SELECT pg_total_relation_size(c.oid), pg_relation_size(c.oid), pg_indexes_size(c.oid),"
        " s.n_tup_ins, s.n_tup_upd, s.n_tup_hot_upd, s.n_live_tup, s.n_dead_tup"
        " FROM pg_class c JOIN pg_stat_user_tables s ON s.relid = c.oid WHERE c.oid = %s::regclass",
        (name,),
    ).fetchone()
    assert row is not None, name
    total, heap, indexes, ins, upd, hot, live, dead = (int(v) for v in row)
    per = float(sagas) if sagas else float("nan")
    index_sizes = {
        str(index): int(size)
        for index, size in conn.execute(
            "SELECT indexrelname, pg_relation_size(indexrelid) FROM pg_stat_user_indexes"
            " WHERE relname = %s ORDER BY 1",
            (name,),
        )
    }
    return {
        "total_bytes": total,
        "table_bytes": heap,
        "index_bytes": indexes,
        # TOAST and the free space/visibility maps: what total holds beyond heap + indexes.
        "other_bytes": total - heap - indexes,
        "total_bytes_per_saga": total / per,
        "table_bytes_per_saga": heap / per,
        "index_bytes_per_saga": indexes / per,
        "index_bytes_per_saga_by_index": {k: v / per for k, v in index_sizes.items()},
        "index_bytes_by_index": index_sizes,
        "n_tup_ins": ins,
        "n_tup_upd": upd,
        "n_tup_hot_upd": hot,
        "hot_update_ratio": hot / upd if upd else float("nan"),
        "n_live_tup": live,
        "n_dead_tup": dead,
    }
