"""Search over quantization candidates: the space and its costs, the objective, strategies."""

from .objective import Objective, Score
from .space import Candidate, QuantizerSlot, SearchSpace, candidate_of
from .strategies import Budget, SearchResult, greedy_mixed_precision, pareto_front

__all__ = ["Budget", "Candidate", "Objective", "QuantizerSlot", "Score", "SearchResult",
           "SearchSpace", "candidate_of", "greedy_mixed_precision", "pareto_front"]
