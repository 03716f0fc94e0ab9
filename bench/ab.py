"""A/B of saga_worker checkouts: the same saga_worker measurements, interleaved per repetition.

    bash bench/run.sh ab base=/tmp/wt-base p2=/tmp/wt-p2 --reps 3

Each NAME=PATH is a checkout of this repository (e.g. ``git worktree add --detach PATH``)
whose saga_worker is benchmarked (PYTHONPATH puts it before the installed one). Every
repetition runs each variant once, in a rotating order, on a freshly created and migrated
database, so that drift in the machine's load spreads over all variants.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import write_json
from .main import METRICS, RESULTS, log, prepare_databases, run_one, summarize
from .systems import Context, Plan


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("variants", nargs="+", metavar="NAME=PATH")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--serial", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--label", default="ab")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    variants = dict(v.split("=", 1) for v in args.variants)
    admin_url, redis_url = os.environ["BENCH_DATABASE_URL"], os.environ["BENCH_REDIS_URL"]
    work_dir = Path(tempfile.mkdtemp(prefix="saga-bench-ab-"))
    plan = Plan(args.n, args.serial, args.warmup)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    began = time.monotonic()
    names = list(variants)
    for rep in range(args.reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            ctx = Context(admin_url, redis_url, work_dir / name, Path(variants[name]))
            ctx.work_dir.mkdir(parents=True, exist_ok=True)
            prepare_databases(ctx)
            result = run_one(ctx, "saga_worker", plan, rep)
            result["variant"] = name
            runs[name].append(result)
            log(f"  ^ variant {name}")
    summary = {name: summarize(rs) for name, rs in runs.items()}
    report = {
        "variants": variants,
        "plan": {"n": plan.n, "serial": plan.serial, "warmup": plan.warmup, "reps": args.reps},
        "loadavg_end": os.getloadavg(),
        "seconds": time.monotonic() - began,
        "runs": runs,
        "summary": summary,
    }
    write_json(Path(args.results) / f"{args.label}.json", report)
    width = 22
    print(f"\n{'metric (median [min-max])':30s}" + "".join(f"{n:>{width}s}" for n in names))
    for path, label, unit, _ in METRICS:
        key = ".".join(path)
        if not any(key in summary[n] for n in names):
            continue
        cells = []
        for n in names:
            e = summary[n].get(key)
            if e is None:
                cells.append(f"{'-':>{width}s}")
                continue
            d = 0 if e["median"] >= 100 else 2
            cells.append(f"{e['median']:.{d}f} [{e['min']:.{d}f}-{e['max']:.{d}f}]".rjust(width))
        print(f"{(label + (' ' + unit if unit else '')):30s}" + "".join(cells))
    shutil.rmtree(work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
