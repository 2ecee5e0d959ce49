"""Strategies that sample subnetworks from a trained supernet or a tabular benchmark.

Every strategy follows one ask/tell protocol (`base.Strategy`) and is registered by name:
`list_strategies()`, `make_strategy(name, space, budget, seed, **options)`.
"""

from . import evolution, predictor, qlearning, random_search, reinforce  # noqa: F401  (register the strategies)
from .base import STRATEGIES, Evaluation, Strategy, Trial, make_strategy, restore, search
from .encoding import DecisionSpace
from .evolution import RegularizedEvolution
from .predictor import Bananas
from .qlearning import QLearning
from .random_search import RandomSearch
from .reinforce import Reinforce


def list_strategies(pattern: str = "*") -> list[str]:
    """Names of the registered strategies."""
    return STRATEGIES.names(pattern)


__all__ = ["STRATEGIES", "Strategy", "Trial", "Evaluation", "make_strategy", "restore", "search", "list_strategies",
           "DecisionSpace", "RandomSearch", "RegularizedEvolution", "Reinforce", "QLearning", "Bananas"]
