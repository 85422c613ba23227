"""The README's picture of the idea: one proximal step of WGSEF against group lasso on a vector of group norms.

    python scripts/figure_idea.py [--out docs/img/idea.png]

Left: how many of 12 groups survive one prox step as the step mu grows. Group lasso keeps fewer and fewer
and ends at none; WGSEF (k = 4) never leaves fewer than k and, from its closing mu on, exactly the top k.
Right: the groups after one step at mu = 1, where both keep the same four: group lasso subtracts mu from every
norm, WGSEF divides the kept ones by 1 + mu, so their ratios are kept. Both curves come from
`wgsef.functional`, the functions the training runs call.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from wgsef.functional import group_lasso_prox, wgsef_prox  # noqa: E402
from wgsef.regularizers.wgsef import closing_mu  # noqa: E402

NORMS = torch.tensor([3.0, 2.7, 2.4, 2.1, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3], dtype=torch.float64)
K, MU = 4, 1.0
COLORS = {"group lasso": "tab:blue", "WGSEF": "tab:orange"}


def survivors(mus: np.ndarray) -> dict[str, list[int]]:
    """Nonzero groups after one prox step of each penalty at each mu (1e-12: below it a norm is a rounding zero)."""
    count = lambda new: int((new > 1e-12).sum())  # noqa: E731
    return {"group lasso": [count(group_lasso_prox(NORMS, float(mu))) for mu in mus],
            "WGSEF": [count(wgsef_prox(NORMS, K, float(mu))) for mu in mus]}


def figure() -> Figure:
    fig = Figure(figsize=(7.2, 2.8), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=(1, 1.25))
    mus = np.geomspace(1e-2, 10, 200)
    for name, counts in survivors(mus).items():
        left.step(mus, counts, where="post", color=COLORS[name], label=name)
    mu_close, _ = closing_mu(NORMS, K)
    left.axhline(K, color="0.6", lw=0.8, ls=":")
    left.axvline(mu_close, color=COLORS["WGSEF"], lw=0.8, ls="--")
    left.annotate(f"WGSEF's closing μ\n(exactly k = {K} from here)", (mu_close, 8), xytext=(1.4, 9.3), fontsize=7,
                  arrowprops=dict(arrowstyle="->", lw=0.6))
    left.set(xscale="log", xlabel="prox step μ = lr·λ", ylabel="nonzero groups (of 12)", ylim=(-0.5, 12.5),
             title="groups left after one prox step")
    left.legend(fontsize=7, loc="lower left")
    idx, width = np.arange(len(NORMS)), 0.27
    right.bar(idx - width, NORMS, width, color="0.75", label="before")
    right.bar(idx, group_lasso_prox(NORMS, MU), width, color=COLORS["group lasso"], label="group lasso: a − μ")
    right.bar(idx + width, wgsef_prox(NORMS, K, MU), width, color=COLORS["WGSEF"],
              label=f"WGSEF (k = {K}): top k, a / (1 + μ)")
    right.set(xticks=idx, xticklabels=[str(i + 1) for i in idx], xlabel="group", ylabel="group norm ‖θ_g‖",
              title=f"the norms after one step at μ = {MU:g}")
    right.legend(fontsize=7, loc="upper right")
    for ax in (left, right):
        ax.title.set_fontsize(9)
        ax.tick_params(labelsize=7)
        ax.xaxis.label.set_fontsize(8)
        ax.yaxis.label.set_fontsize(8)
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/img/idea.png")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python scripts/figure_idea.py" + ("" if args.out == "docs/img/idea.png" else f" --out {args.out}")
    figure().savefig(out, dpi=150, metadata={"Description": command})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
