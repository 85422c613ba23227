"""What the training loop sees of a sparsity method.

Every method (WGSEF, group lasso, SSL, SR-STE, GBLR, or none) is a `Regularizer`. The loop calls, in
order: `attach` once (build groups, swap modules), `param_groups` when the optimizer is built,
`on_epoch_start` each epoch, `loss` each step (added to the data loss), `after_step` after each
optimizer step, `metrics` at the end of each epoch, and `finalize` once after training.
Proximal methods are `GroupPenalty` subclasses: the optimizer (prox-SGD, HSPG) applies their prox,
so their `after_step` does nothing.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from wgsef.groups.base import GroupSet


class Regularizer:
    """The identity method: dense training. Subclasses override only what they need."""

    name = "none"

    def attach(self, model: nn.Module, example_input: Tensor) -> nn.Module:
        """Prepare `model` (build groups, swap layers); return the model to train."""
        return model

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Optimizer param groups with special settings (e.g. {'params': [...], 'weight_decay': 0}).
        Parameters not listed here get the optimizer's defaults."""
        return []

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        pass

    def loss(self) -> Tensor | None:
        """A term added to the training loss, or None."""
        return None

    def after_step(self, lr: float) -> None:
        """Called after every optimizer step with the learning rate just used."""

    def metrics(self) -> dict[str, float]:
        """Scalars logged once per epoch."""
        return {}

    def finalize(self, model: nn.Module) -> nn.Module:
        """Turn the trained model into its deployable form (fold masks, materialise weights)."""
        return model

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class GroupPenalty(Regularizer):
    """lam * Omega(theta) for a group penalty Omega that acts on group norms only.

    Subclasses implement three functions of the group-norm vector a:
      `norm_value(a)`        Omega as a function of a,
      `prox_factors(a, mu)`  per-group factors f with prox_{mu Omega}(theta)_g = f_g theta_g,
      `grad_coeffs(a)`       per-group c with dOmega/dtheta_g = c_g theta_g on nonzero groups.
    """

    def __init__(self, lam: float, weight_decay: float | None = None):
        if lam < 0:
            raise ValueError(f"regularization strength lam must be >= 0, got {lam}")
        if weight_decay is not None and not weight_decay >= 0:
            raise ValueError(f"regularizer weight_decay must be null or >= 0, got {weight_decay}")
        self.lam = float(lam)
        self.weight_decay = None if weight_decay is None else float(weight_decay)
        self.groups: GroupSet | None = None

    def build_groups(self, model: nn.Module, example_input: Tensor) -> GroupSet:
        raise NotImplementedError

    def attach(self, model: nn.Module, example_input: Tensor) -> nn.Module:
        self.groups = self.build_groups(model, example_input)
        return model

    def param_groups(self, model: nn.Module) -> list[dict]:
        """One weight-decay rule in every method (docs/what_wgsef_adds.md): the grouped parameters get the
        optimizer's weight decay like every other parameter, and the penalty is added to it, never
        substituted. `weight_decay` (a number) gives them that weight decay instead (0: the penalty alone,
        OTO's convention and this project's former rule for lam > 0)."""
        if self.weight_decay is None:
            return []
        return [{"params": self.groups.params(), "weight_decay": self.weight_decay}]

    def norm_value(self, a: Tensor) -> Tensor:
        raise NotImplementedError

    def prox_factors(self, a: Tensor, mu: float) -> Tensor:
        raise NotImplementedError

    def grad_coeffs(self, a: Tensor) -> Tensor:
        raise NotImplementedError

    def value(self) -> Tensor:
        return self.norm_value(self.groups.norms())

    @torch.no_grad()
    def prox_(self, lr: float) -> None:
        """theta <- prox of (lr * lam * Omega) at theta, in place."""
        if self.lam > 0:
            self.groups.scale_(self.prox_factors(self.groups.norms(), lr * self.lam))

    def metrics(self) -> dict[str, float]:
        a = self.groups.norms()
        return {"penalty": float(self.norm_value(a)), "nonzero_groups": int((a > 0).sum()),
                "group_sparsity": float((a == 0).float().mean())}
