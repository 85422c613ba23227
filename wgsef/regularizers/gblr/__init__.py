"""Gaudi-GBLR (Lee & Kim, ICLR 2024; docs/methods.md section 5) in three parts: `layers` (the GBLR
Linear / Conv2d and their masks), `training` (the Regularizer that swaps layers in and shrinks widths, and
the structural Adam) and `deploy` (the exact inference forms and the choice of the fastest)."""
from wgsef.regularizers.gblr.training import GBLR, StructuralAdam

__all__ = ["GBLR", "StructuralAdam"]
