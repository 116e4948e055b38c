"""Search over quantization candidates: the space, its costs, and (to come) the strategies."""

from .space import Candidate, QuantizerSlot, SearchSpace

__all__ = ["Candidate", "QuantizerSlot", "SearchSpace"]
