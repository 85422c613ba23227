from wgsef.regularizers.base import GroupPenalty, Regularizer

__all__ = ["GroupPenalty", "Regularizer"]
