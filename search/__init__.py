"""Search over quantization candidates: the space and its costs, the objective, strategies."""

from .objective import Objective, Score
from .space import Candidate, QuantizerSlot, SearchSpace, candidate_of
from .strategies import (
                         STRATEGIES,
                         Budget,
                         EvolutionSettings,
                         SearchResult,
                         SearchRun,
                         StopCriteria,
                         evolutionary_search,
                         greedy_mixed_precision,
                         pareto_front,
                         threshold_search,
)

__all__ = ["STRATEGIES", "Budget", "Candidate", "EvolutionSettings", "Objective",
           "QuantizerSlot", "Score", "SearchResult", "SearchRun", "SearchSpace", "StopCriteria",
           "candidate_of", "evolutionary_search", "greedy_mixed_precision", "pareto_front",
           "threshold_search"]
