"""The PNG: throughput, serial latency and database cost per unit, median with min-max."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLORS = {
    "saga_worker": "#1f77b4",
    "saga_worker_events": "#aec7e8",
    "celery_chain": "#7f7f7f",
    "dbos_start": "#d62728",
    "dbos_queue": "#ff9896",
}

PANELS = (
    ("burst.throughput", "burst throughput (units/s)"),
    ("serial.p50_ms", "serial latency p50 (ms)"),
    ("serial.p99_ms", "serial latency p99 (ms)"),
    ("burst.write_txns_per_unit", "write transactions per unit"),
    ("burst.wal_bytes_per_unit", "WAL bytes per unit"),
)


CPU_PARTS = (
    ("system", "system under test"),
    ("postgres", "PostgreSQL"),
    ("redis", "Redis"),
    ("driver", "producer"),
)


def draw(report: dict[str, Any], path: Path) -> None:
    summary = report["summary"]
    systems = list(summary)
    fig, grid = plt.subplots(2, 3, figsize=(13, 8.5))
    axes = list(grid.flat)
    for ax, (metric, title) in zip(axes, PANELS, strict=False):
        medians, lows, highs = [], [], []
        for system in systems:
            entry = summary[system].get(metric, {"median": 0.0, "min": 0.0, "max": 0.0})
            medians.append(entry["median"])
            lows.append(entry["median"] - entry["min"])
            highs.append(entry["max"] - entry["median"])
        bars = ax.bar(
            range(len(systems)),
            medians,
            yerr=[lows, highs],
            capsize=4,
            color=[COLORS.get(s, "#2ca02c") for s in systems],
        )
        ax.bar_label(bars, labels=[_fmt(v) for v in medians], fontsize=8)
        ax.set_xticks(range(len(systems)), systems, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    ax = axes[-1]
    bottom = [0.0] * len(systems)
    for part, label in CPU_PARTS:
        values = [
            summary[s].get(f"burst.cpu_ms_per_unit.{part}", {"median": 0.0})["median"]
            for s in systems
        ]
        ax.bar(range(len(systems)), values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.bar_label(ax.containers[-1], labels=[_fmt(v) for v in bottom], fontsize=8)
    ax.set_xticks(range(len(systems)), systems, rotation=30, ha="right", fontsize=8)
    ax.set_title("CPU ms per unit (burst, median)", fontsize=10)
    ax.legend(fontsize=7)
    plan, meta = report["plan"], report["meta"]
    fig.suptitle(
        f"saga_worker vs Celery chain (ceiling) vs DBOS — N={plan['n']}, serial={plan['serial']}, "
        f"median of {plan['reps']} (bars: min-max)\n{meta['cpus']} CPUs, load average "
        f"{meta['loadavg_start'][0]:.1f} at start (shared machine: others' load is in the JSON)",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.2f}"
