"""Example sagas; importing this module registers `backtest_workflow` (DESIGN.md §8)."""

from .backtest import backtest_workflow

__all__ = ["backtest_workflow"]
