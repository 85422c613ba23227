"""WGSEF: lam * weighted group sparse envelope function over a model's groups (docs/methods.md section 1).

Scope `layer` evaluates WGSEF on each block of the GroupSet (a layer, or a set of coupled layers) with
its own k_l; scope `global` evaluates one WGSEF over all groups with one k. A prox step never leaves
fewer than k groups nonzero, so exactly k groups per scope come from HSPG or from the end of the
sparsification phase here, at epoch `finish_epoch`, in one of three ways (`finish`):

  top_k         the k top-ranked groups of each scope are kept, the rest zeroed (a hard projection).
  gradual       gradual pruning (Zhu & Gupta 2017): at the start of every epoch t of the window from
                `continuation_start` (t0) to finish_epoch (t0 + n), each scope keeps its top
                k + round((n_l - k)(1 - (t - t0) / n)^3) groups among those not yet pruned (the cubic
                sparsity schedule s_t = s_f + (s_i - s_f)(1 - (t - t0) / n)^3 from s_i = 0 to s_f = 1 - k / n_l,
                one pruning step per epoch); pruned groups are held at zero; exactly k at finish_epoch.
  continuation  lam grows geometrically, epoch by epoch, from `lam` at `continuation_start` to `lam_final`
                at finish_epoch (a homotopy); each prox step is followed by a per-scope rescale (see
                `_rescale`), and a scope whose prox leaves exactly k groups is held at once. At finish_epoch
                every scope still open takes one closing prox step with mu_close, the smallest mu for
                which one prox step leaves exactly k groups (closed form, `closing_mu`): the prox itself,
                never a top-k, makes the last zeros (a top-k only breaks exact ties, where no mu can).

Held scopes are fine-tuned: their prox is off and their zero groups are set back to zero after every
step. `lam: 0` with `finish: top_k` is magnitude (group-norm) pruning: dense training, top-k, fine-tune;
`lam: 0` with `finish: gradual` is gradual magnitude pruning (method=gmp).

Every step that picks k groups ranks them by `keep_score` (a / sqrt(d), the order of the prox's support;
plain group norm a when weights are ones).
"""
from __future__ import annotations

import math
from numbers import Integral, Real

import torch
from torch import Tensor, nn

from wgsef.functional import Scopes, _grad_coeffs, _prox, _value, keep_score, rank_in_scope
from wgsef.groups import SCHEMES, GroupSet, build_groups
from wgsef.regularizers.base import GroupPenalty

SCOPES = ("layer", "global")
WEIGHTS = ("ones", "size", "flops")
FINISHES = ("top_k", "continuation", "gradual")


def parse_k(k) -> int | float:
    """A count (int >= 1) or a fraction of groups kept (float in (0, 1))."""
    if isinstance(k, Integral) and not isinstance(k, bool) and k >= 1:
        return int(k)
    if isinstance(k, Real) and not isinstance(k, bool) and 0 < k < 1:
        return float(k)
    raise ValueError(f"k must be a group count (int >= 1) or a kept fraction in (0, 1), got {k!r}")


def group_weights(groups: GroupSet, kind: str) -> Tensor:
    """d_j with mean 1: ones, group size, or FLOPs removed when the group is zero."""
    if kind == "ones":
        return torch.ones(len(groups))
    raw = groups.sizes if kind == "size" else groups.flops
    if raw is None or (raw <= 0).any():
        raise ValueError("weights='flops' needs positive FLOPs for every group (build groups with an example input)")
    return raw / raw.mean()


@torch.no_grad()
def closing_mu(a: Tensor, k: int, weights: Tensor | None = None) -> tuple[float, Tensor]:
    """The smallest mu for which one prox step of mu * WGSEF_{k,d} at norms a leaves exactly k groups, and
    the keep mask of those k groups. Needs more than k nonzero norms.

    With s = sqrt(d) a, the prox zeroes j iff gamma s_j <= mu d_j and keeps i whole (theta_i = 1) iff
    gamma s_i >= 1 + mu d_i; with exactly k groups left all k are whole (sum theta = k). A gamma doing
    both exists iff mu (s_i / r_next - d_i) >= 1 for every kept i, where the kept groups are the top k by
    r = a / sqrt(d) and r_next is the (k+1)-th r. The prox at that mu scales kept groups by 1 / (1 + mu d_i)
    and zeroes the rest. A kept group tied with r_next (s_i / r_next = d_i) has no finite mu: ties are
    broken by torch.topk and ignored in the max (mu = 0 when every kept group is tied).
    """
    d = torch.ones_like(a) if weights is None else weights.to(a)
    r = keep_score(a, d)
    top = r.topk(k + 1)
    head, r_next = top.indices[:k], top.values[k]
    gap = a[head] * d[head].sqrt() / r_next - d[head]
    mu = float(gap[gap > 0].reciprocal().max()) if bool((gap > 0).any()) else 0.0
    keep = torch.zeros_like(a, dtype=torch.bool)
    keep[head] = True
    return mu, keep


class WGSEF(GroupPenalty):
    name = "wgsef"

    def __init__(self, lam: float, k: int | float, scheme: str = "filter", scope: str = "layer",
                 weights: str = "ones", layers: list[str] | None = None, block: tuple[int, int] | None = None,
                 finish_epoch: int | None = None, finish: str = "top_k", lam_final: float = 100.0,
                 continuation_start: int = 0, weight_decay: float | None = None):
        super().__init__(lam, weight_decay)
        for value, allowed, what in ((scheme, SCHEMES, "scheme"), (scope, SCOPES, "scope"),
                                     (weights, WEIGHTS, "weights"), (finish, FINISHES, "finish")):
            if value not in allowed:
                raise ValueError(f"unknown {what} '{value}'; choose one of {', '.join(allowed)}")
        for value, what in ((finish_epoch, "finish_epoch"), (continuation_start, "continuation_start")):
            if value is not None and (not isinstance(value, Integral) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{what} must be an epoch number >= 0, got {value!r}")
        if finish == "continuation" and not (lam > 0 and finish_epoch is not None):
            raise ValueError(f"finish=continuation needs lam > 0 and a finish_epoch, got lam={lam}, "
                             f"finish_epoch={finish_epoch}")
        if finish == "gradual" and finish_epoch is None:
            raise ValueError("finish=gradual needs a finish_epoch (the end of the pruning window)")
        if finish == "continuation" and not (isinstance(lam_final, Real) and lam <= lam_final < math.inf):
            raise ValueError(f"lam_final must be a number >= lam, got {lam_final!r}")
        self.k, self.scheme, self.scope, self.weights = parse_k(k), scheme, scope, weights
        self.layers, self.block, self.finish_epoch = layers, block, finish_epoch
        self.finish_mode, self.lam_final, self.continuation_start = finish, float(lam_final), continuation_start
        self.lam0 = self.lam
        self.held: Tensor | None = None  # per group: its scope's support is fixed (prox off); None: none yet
        self.keep: Tensor | None = None  # per group: may be nonzero (True on scopes still open)
        self.all_held = False
        # gradual pruning with lam = 0: every zero group is pruned by the schedule, none by the prox
        self.finish: dict[str, float] = {"prox_zeroed_groups": 0} if finish == "gradual" and lam == 0 else {}

    def build_groups(self, model: nn.Module, example_input: Tensor) -> GroupSet:
        groups = build_groups(model, self.scheme, example_input, layers=self.layers, block=self.block)
        if isinstance(self.k, int) and self.k > len(groups):
            raise ValueError(f"k={self.k} is larger than the number of {self.scheme} groups ({len(groups)}); "
                             "give a smaller count or a kept fraction such as k=0.5")
        sizes = [b.n for b in groups.blocks] if self.scope == "layer" else [len(groups)]
        self.bounds = torch.tensor([0] + sizes).cumsum(0).tolist()
        # a count is capped at the scope's groups; a fraction keeps round-half-up(frac * n) groups, at least 1
        self.ks = [min(n, self.k) if isinstance(self.k, int) else max(1, math.floor(self.k * n + 0.5))
                   for n in sizes]
        self.d = group_weights(groups, self.weights)
        return groups

    def _weights(self, a: Tensor) -> Tensor | None:
        """The group weights on a's device and dtype (moved once), or None for weights='ones'."""
        if self.weights == "ones":
            return None
        if self.d.device != a.device or self.d.dtype != a.dtype:
            self.d = self.d.to(a)
        return self.d

    def _scopes(self, a: Tensor):
        """(slice, k, weights or None) of each scope; the weights follow a's device and dtype."""
        d = self._weights(a)
        for lo, hi, k in zip(self.bounds[:-1], self.bounds[1:], self.ks):
            yield slice(lo, hi), k, None if d is None else d[lo:hi]

    @property
    def scopes(self) -> Scopes:
        """All scopes at once, for the batched value, gradient and prox (rebuilt only if the ks change)."""
        if getattr(self, "_batched", None) is None or self._batched.ks != self.ks:
            self._batched = Scopes([hi - lo for lo, hi in zip(self.bounds[:-1], self.bounds[1:])], self.ks)
        return self._batched

    def norm_value(self, a: Tensor) -> Tensor:
        return _value(a, self._weights(a), self.scopes)

    def prox_factors(self, a: Tensor, mu: float) -> Tensor:
        if self.all_held:  # the prox is off everywhere; the held support is enforced
            return self.keep.to(a)
        new = _prox(a, mu, self._weights(a), self.scopes)
        factors = torch.where(a > 0, new / a, 0.0)
        return factors if self.held is None else torch.where(self.held.to(a.device), self.keep.to(a), factors)

    def grad_coeffs(self, a: Tensor) -> Tensor:
        if self.all_held:
            return torch.zeros_like(a)
        coeffs = _grad_coeffs(a, self._weights(a), self.scopes)
        return coeffs if self.held is None else torch.where(self.held.to(a.device), 0.0, coeffs)

    @torch.no_grad()
    def prox_(self, lr: float) -> None:
        """theta <- prox of (lr * lam * WGSEF) on open scopes; with finish=continuation a scope is held on
        the step its prox leaves k groups (tensor ops only: no host sync)."""
        if self.lam == 0 or self.all_held:
            return
        a = self.groups.norms()
        factors = self.prox_factors(a, lr * self.lam)
        if self.finish_mode == "continuation":
            factors = factors * self._rescale(a, a * factors)
            self._hold_reached(a * factors)
        self.groups.scale_(factors)

    def _rescale(self, a: Tensor, new: Tensor) -> Tensor:
        """Per group, the factor that gives its scope back its largest group norm (1 on an all-zero scope).
        WGSEF is 2-homogeneous, so prox(c theta) = c prox(theta): the rescaled step zeroes the same groups
        and, with weights ones, leaves the whole groups (theta = 1) unchanged, undoing the prox's common
        ridge factor 1 / (1 + mu) that BatchNorm networks cannot restore."""
        scope_of = self._scope_of(a.device)
        top = [torch.zeros(len(self.ks), device=a.device, dtype=a.dtype).scatter_reduce_(0, scope_of, x, "amax")
               for x in (a, new)]
        return torch.where(top[1] > 0, top[0] / top[1], 1.0)[scope_of]

    def _scope_of(self, device: torch.device) -> Tensor:
        """The scope index of every group, and on the side the k of every scope (k_of_scope) and the first
        position of every group's scope (start_of), on `device`; built once per device and set of scopes."""
        key = (tuple(self.bounds), tuple(self.ks), device)
        if getattr(self, "_tables", None) != key:
            sizes = torch.tensor(self.bounds).diff()
            self.scope_of = torch.repeat_interleave(torch.arange(len(sizes)), sizes).to(device)
            self.k_of_scope = torch.tensor(self.ks, device=device)
            self.start_of = torch.tensor(self.bounds[:-1], device=device)[self.scope_of]
            self._tables = key
        return self.scope_of

    def keep_rank(self, a: Tensor) -> Tensor:
        """0-based rank of every group in its scope by keep_score (a / sqrt(d)), largest first: the one order
        in which the prox, closing_mu, the top-k finish, gradual pruning and HSPG's protected set keep groups
        (sync-free)."""
        scope_of = self._scope_of(a.device)
        return rank_in_scope(keep_score(a, self._weights(a)), scope_of, self.start_of)

    def _hold_reached(self, norms: Tensor) -> None:
        """Hold every open scope with at most k nonzero groups, keeping its nonzero groups."""
        nonzero, scope_of = norms > 0, self._scope_of(norms.device)
        counts = torch.zeros_like(self.k_of_scope).index_add_(0, scope_of, nonzero.long())
        reached = (counts <= self.k_of_scope)[scope_of]
        if self.held is None:
            self.held, self.keep = reached, torch.where(reached, nonzero, True)
        else:
            held = self.held.to(norms.device)
            self.keep = torch.where(held, self.keep.to(norms.device), torch.where(reached, nonzero, True))
            self.held = held | reached

    # end of the sparsification phase --------------------------------------------------------------------
    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        if self.all_held:
            return
        if self.held is not None and bool(self.held.all()):  # the continuation reached k everywhere
            self._hold_all()
        elif self.finish_epoch is not None and epoch >= self.finish_epoch:
            self.project_top_k() if self.finish_mode == "top_k" else self.close()
        elif self.finish_mode == "gradual":
            self.prune_to(self.gradual_ks(epoch))
        elif self.finish_mode == "continuation":  # geometric from lam at continuation_start to lam_final at finish
            t = max(0, epoch - self.continuation_start) / max(1, self.finish_epoch - self.continuation_start)
            self.lam = self.lam0 * (self.lam_final / self.lam0) ** t

    def _hold_all(self) -> None:
        self.all_held = True
        self.keep = self.groups.norms() > 0 if self.keep is None else self.keep
        self.held = torch.ones_like(self.keep)
        self.finish["prox_zeroed_groups"] = self.finish.get("prox_zeroed_groups", int((~self.keep).sum()))

    def gradual_ks(self, epoch: int) -> list[int]:
        """Groups each scope keeps at `epoch` under the cubic schedule (k + round((n - k)(1 - tau)^3))."""
        span = self.finish_epoch - self.continuation_start  # no window (a 1-epoch run): k at once
        tau = 1.0 if span <= 0 else min(1.0, max(0, epoch - self.continuation_start) / span)
        sizes = [hi - lo for lo, hi in zip(self.bounds[:-1], self.bounds[1:])]
        return [k + math.floor((n - k) * (1 - tau) ** 3 + 0.5) for n, k in zip(sizes, self.ks)]

    def top_keep(self, a: Tensor, ks: list[int]) -> Tensor:
        """The mask of the ks[i] top-ranked groups (keep_rank) of every scope i among those still kept."""
        if self.keep is not None:  # a pruned group never comes back: it ranks below every kept one
            a = torch.where(self.keep.to(a.device), a, -1.0)
        scope_of = self._scope_of(a.device)
        return self.keep_rank(a) < torch.tensor(ks, device=a.device)[scope_of]

    @torch.no_grad()
    def prune_to(self, ks: list[int]) -> None:
        """Zero every group outside its scope's ks top-ranked ones and keep it at zero (gradual pruning)."""
        self.keep = self.top_keep(self.groups.norms(), ks)
        self.groups.scale_(self.keep.to(self.groups.params()[0]))

    @torch.no_grad()
    def project_top_k(self) -> None:
        """Keep the k top-ranked groups of each scope (keep_score), zero the others, and freeze that support."""
        a = self.groups.norms()
        keep = self.top_keep(a, self.ks)
        self.finish["group_sparsity_before_finish"] = float((a == 0).float().mean())
        self.finish.setdefault("prox_zeroed_groups", int((a == 0).sum()))
        self.keep = keep
        self.groups.scale_(keep.to(a))
        self.finish["group_sparsity_after_finish"] = float(self.groups.zero_mask().float().mean())
        self._hold_all()

    @torch.no_grad()
    def close(self) -> None:
        """The continuation's closing rule: every open scope takes one prox step with its closing_mu, which
        leaves exactly k groups, then the whole support is held."""
        a = self.groups.norms().double()
        factors = torch.ones_like(a) if self.keep is None else self.keep.to(a)
        held = torch.zeros_like(a, dtype=torch.bool) if self.held is None else self.held.to(a.device)
        mus = [0.0]
        for s, k, d in self._scopes(a):
            if bool(held[s].all()) or int((a[s] > 0).sum()) <= k:
                continue
            mu, keep = closing_mu(a[s], k, d)
            factors[s] = keep / (1 + mu * (1.0 if d is None else d))
            mus.append(mu)
        factors *= self._rescale(a, a * factors)
        self.groups.scale_(factors.float())
        self.finish["closing_mu"] = max(mus)
        self.keep, self.held = (factors > 0) & (a > 0), None
        self._hold_all()

    def after_step(self, lr: float) -> None:
        if self.keep is not None:
            self.keep = self.keep.to(self.groups.params()[0].device)  # once, after loading a CPU checkpoint
            self.groups.scale_(self.keep)

    # logging and resuming ------------------------------------------------------------------------------
    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        """Per epoch: nonzero groups against k (summed over scopes), lam in effect (0 once the prox is off
        everywhere), groups the prox alone has zeroed (frozen at a top-k finish), the finish's records."""
        params = self.groups.params()
        zeros = sum(int((p == 0).sum()) for p in params)
        m = super().metrics()
        return {**m, "k_groups": sum(self.ks), "lam_eff": 0.0 if self.all_held else self.lam,
                "prox_zeroed_groups": self.finish.get("prox_zeroed_groups", len(self.groups) - m["nonzero_groups"]),
                "param_sparsity": zeros / sum(p.numel() for p in params), **self.finish}

    def state_dict(self) -> dict:
        cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
        return {"keep": cpu(self.keep), "held": cpu(self.held), "all_held": self.all_held, "lam": self.lam,
                "finish": dict(self.finish)}

    def load_state_dict(self, state: dict) -> None:
        self.keep, self.held, self.finish = state["keep"], state.get("held"), dict(state["finish"])
        self.all_held = state.get("all_held", self.keep is not None)  # older checkpoints: keep only
        self.lam = state.get("lam", self.lam)
