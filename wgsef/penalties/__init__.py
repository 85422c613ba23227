from wgsef.penalties.base import GroupPenalty, Regularizer

__all__ = ["GroupPenalty", "Regularizer"]
