"""Example sagas; importing this module registers `backtest_workflow` (docs/contract.md)."""

from .backtest import backtest_workflow

__all__ = ["backtest_workflow"]
