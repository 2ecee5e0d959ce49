"""Meta-learning architectures and weights across few-shot tasks (MAML, first-order MAML, Reptile; MetaNAS-style)."""

from .episodes import (
    Episode,
    EpisodeSampler,
    FewShotDataset,
    digits_fewshot,
    fewshot_dataset,
    split_by_class,
    stack_episodes,
    with_rotations,
)
from .learner import METHODS, AdaptedNetwork, MetaLearner, NonFiniteUpdate, maml_meta_gradient, reptile_direction
from .omniglot import load_omniglot
from .plots import plot_meta_curves
from .run import MetaConfig, MetaResult, RunInterrupted, confidence_interval, describe, meta_learn

__all__ = ["Episode", "EpisodeSampler", "FewShotDataset", "digits_fewshot", "fewshot_dataset", "split_by_class",
           "stack_episodes", "with_rotations", "METHODS", "AdaptedNetwork", "MetaLearner", "NonFiniteUpdate",
           "maml_meta_gradient", "reptile_direction", "load_omniglot", "plot_meta_curves", "MetaConfig", "MetaResult",
           "RunInterrupted", "confidence_interval", "describe", "meta_learn"]
