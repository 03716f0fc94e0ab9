"""Benchmark of saga_worker against plain Celery (the ceiling) and DBOS (the peer).

Run with ``bash bench/run.sh``; see the README section "Benchmark".
"""
