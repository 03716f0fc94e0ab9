"""Celery adapter: app factory, tasks, dispatch."""
