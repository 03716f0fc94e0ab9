"""Example sagas; importing this module registers `backtest_workflow` and `order_workflow`
(docs/contract.md)."""

from .backtest import backtest_workflow
from .orders import order_workflow

__all__ = ["backtest_workflow", "order_workflow"]
