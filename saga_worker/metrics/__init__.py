"""Prometheus metrics (docs/contract.md, Metrics), fed by engine hooks, served per process group.

One concern per module, imported from the module that owns it (this package re-exports
nothing):

- `hooks`: the contract's counters and histograms and how a transition updates them;
- `gauges`: saga state gauges read from the checkpoint table at scrape time;
- `multiprocess`: per-process metric files, their compaction, and their directory;
- `serve`: which process counts and serves what (worker, beat, operator processes).
"""
