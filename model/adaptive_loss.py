"""The paper's adaptive loss: task weights re-solved every batch from the tasks' gradients.

Every step the weights w solve

    min_w  1/2 ||sum_i w_i g_i||^2 + 1/2 sum_i (w_i - 1/K)^2    s.t.  sum_i w_i = 1,  w_i >= 0

where g_i is the gradient of task i's loss with respect to the shared encoder parameters. With the
Gram matrix G_ij = g_i . g_j this is the strictly convex QP  1/2 w^T (G + I) w - (1/K) 1^T w, solved
exactly by enumerating the active sets (K <= 4 tasks: at most 15 small linear systems).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch


def solve_task_weights(gram: np.ndarray) -> np.ndarray:
    """Exact solution of the adaptive-loss QP for a (K, K) Gram matrix of task gradients."""
    gram = np.asarray(gram, dtype=np.float64)
    k = gram.shape[0]
    assert gram.shape == (k, k), "the Gram matrix must be square"
    hessian = gram + np.eye(k)
    linear = np.full(k, 1.0 / k)
    best, best_value = None, np.inf
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            s = list(support)
            # KKT system of the equality-constrained QP on the support: [A 1; 1^T 0][w; nu] = [b; 1].
            system = np.zeros((size + 1, size + 1))
            system[:size, :size] = hessian[np.ix_(s, s)]
            system[:size, size] = 1.0
            system[size, :size] = 1.0
            rhs = np.append(linear[s], 1.0)
            try:
                solution = np.linalg.solve(system, rhs)
            except np.linalg.LinAlgError:
                continue
            w = np.zeros(k)
            w[s] = solution[:size]
            if (w < -1e-12).any():
                continue
            # Inactive tasks need a non-negative multiplier: (A w - b)_i + nu >= 0.
            multipliers = hessian @ w - linear + solution[size]
            if (multipliers < -1e-9 * max(1.0, np.abs(hessian).max())).any():
                continue
            value = 0.5 * w @ hessian @ w - linear @ w
            if value < best_value:
                best, best_value = w, value
    assert best is not None, "the adaptive-loss QP always has a solution on the simplex"
    best = np.clip(best, 0.0, None)
    return best / best.sum()


@dataclass
class WeightedLoss:
    """The loss to descend, with every task's weight and weighted term for the training log."""

    total: torch.Tensor
    weights: dict[str, float]
    terms: dict[str, float]


class AdaptiveLoss:
    """Weigh named task losses by the adaptive QP (or by equal fixed weights, the ablation)."""

    def __init__(self, shared_parameters: Sequence[torch.nn.Parameter], adaptive: bool = True):
        self.shared_parameters = [p for p in shared_parameters if p.requires_grad]
        self.adaptive = adaptive

    def task_gram(self, losses: Mapping[str, torch.Tensor]) -> np.ndarray:
        """Gram matrix of the tasks' gradients with respect to the shared parameters."""
        flat = []
        for loss in losses.values():
            grads = torch.autograd.grad(loss, self.shared_parameters, retain_graph=True, allow_unused=True)
            flat.append(
                torch.cat(
                    [
                        (g if g is not None else torch.zeros_like(p)).float().reshape(-1)
                        for g, p in zip(grads, self.shared_parameters, strict=True)
                    ]
                )
            )
        stacked = torch.stack(flat)  # (K, P)
        return (stacked @ stacked.T).double().cpu().numpy()

    def __call__(self, losses: Mapping[str, torch.Tensor]) -> WeightedLoss:
        names = list(losses)
        if self.adaptive:
            weights = solve_task_weights(self.task_gram(losses))
        else:
            weights = np.full(len(names), 1.0 / len(names))
        total = sum(float(w) * losses[n] for w, n in zip(weights, names, strict=True))
        return WeightedLoss(
            total=total,  # type: ignore[arg-type]
            weights={n: float(w) for n, w in zip(names, weights, strict=True)},
            terms={n: float(w) * float(losses[n].detach()) for n, w in zip(names, weights, strict=True)},
        )
