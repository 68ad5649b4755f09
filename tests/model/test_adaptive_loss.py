"""The adaptive-loss QP against its KKT conditions and an independent projected-gradient solver."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.adaptive_loss import AdaptiveLoss, solve_task_weights


def objective(w: np.ndarray, gram: np.ndarray) -> float:
    k = len(w)
    return 0.5 * w @ gram @ w + 0.5 * np.sum((w - 1 / k) ** 2)


def project_to_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto {w >= 0, sum w = 1} (Duchi et al. 2008)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u)
    rho = np.nonzero(u * np.arange(1, len(v) + 1) > (css - 1))[0][-1]
    theta = (css[rho] - 1) / (rho + 1.0)
    return np.maximum(v - theta, 0)


def projected_gradient(gram: np.ndarray, steps: int = 20000) -> np.ndarray:
    k = len(gram)
    hessian = gram + np.eye(k)
    step = 1.0 / np.linalg.eigvalsh(hessian).max()
    w = np.full(k, 1.0 / k)
    for _ in range(steps):
        w = project_to_simplex(w - step * (hessian @ w - 1.0 / k))
    return w


def random_gram(rng: np.random.Generator, k: int, scale: float) -> np.ndarray:
    g = rng.normal(size=(k, 50)) * rng.uniform(0.1, 1.0, size=(k, 1)) * scale
    return g @ g.T


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("scale", [0.05, 1.0, 5.0])
def test_solver_satisfies_kkt_and_matches_independent_solver(k: int, scale: float) -> None:
    rng = np.random.default_rng(k * 100 + int(scale * 10))
    for _ in range(10):
        gram = random_gram(rng, k, scale)
        w = solve_task_weights(gram)
        assert w.min() >= 0 and abs(w.sum() - 1) < 1e-9
        # KKT: gradient + nu = mu >= 0, with mu = 0 on the support.
        gradient = (gram + np.eye(k)) @ w - 1.0 / k
        support = w > 1e-9
        nu = -gradient[support].mean()
        assert np.allclose(gradient[support] + nu, 0, atol=1e-7)
        assert (gradient[~support] + nu >= -1e-7).all()
        reference = projected_gradient(gram)
        assert np.allclose(w, reference, atol=1e-4)
        assert objective(w, gram) <= objective(reference, gram) + 1e-10


def test_equal_orthogonal_gradients_give_equal_weights() -> None:
    assert np.allclose(solve_task_weights(np.eye(4) * 3.0), 0.25)
    assert np.allclose(solve_task_weights(np.zeros((3, 3))), 1 / 3)


def test_larger_gradient_gets_smaller_weight() -> None:
    w = solve_task_weights(np.diag([10.0, 1.0]))
    assert w[0] < w[1]
    # Closed form for two orthogonal tasks: minimise 1/2 (10 a^2 + b^2) + 1/2 ((a-.5)^2 + (b-.5)^2), a + b = 1.
    assert np.allclose(w, [2 / 13, 11 / 13])


def test_opposed_gradients_keep_both_tasks() -> None:
    # g1 = -g2: the combined gradient vanishes at equal weights, which is also the regulariser's optimum.
    g = np.array([[1.0, 0.0], [-1.0, 0.0]])
    assert np.allclose(solve_task_weights(g @ g.T), [0.5, 0.5])


def test_adaptive_loss_uses_gradients_of_shared_parameters() -> None:
    torch.manual_seed(0)
    shared = torch.nn.Linear(3, 3)
    x = torch.randn(8, 3)
    h = shared(x)
    losses = {"a": (h**2).mean(), "b": h.sum() * 0.01}
    loss = AdaptiveLoss(list(shared.parameters()))
    grams = loss.task_gram(losses)
    flat = []
    for value in losses.values():
        grads = torch.autograd.grad(value, list(shared.parameters()), retain_graph=True)
        flat.append(torch.cat([g.reshape(-1) for g in grads]))
    expected = torch.stack(flat) @ torch.stack(flat).T
    assert np.allclose(grams, expected.double().numpy(), rtol=1e-5)
    weighted = loss(losses)
    assert set(weighted.weights) == {"a", "b"}
    assert abs(sum(weighted.weights.values()) - 1) < 1e-9
    expected_total = sum(weighted.weights[n] * float(v.detach()) for n, v in losses.items())
    assert float(weighted.total.detach()) == pytest.approx(expected_total, rel=1e-5)


def test_fixed_weights_ablation_is_equal() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    weighted = AdaptiveLoss([p], adaptive=False)({"a": p.sum(), "b": (p**2).sum() * 100, "c": p[0]})
    assert weighted.weights == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
