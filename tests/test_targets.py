"""Closed-form unlearning targets (docs/mathematics.md §2) on Gaussian mixtures and their score / noise forms."""
import numpy as np
import pytest
import torch

from vdu import gmm, targets

torch.set_num_threads(1)

Q = gmm.GMM([0.3, 0.2, 0.25, 0.25], [(-1.5, -1.5), (1.5, -1.5), (-1.5, 1.5), (1.5, 1.5)], 0.25)
GRID = gmm.Grid(6.0, 161)


def test_gmm_validates_inputs():
    with pytest.raises(ValueError, match="sum to 1"):
        gmm.GMM([0.5, 0.6], [(0, 0), (1, 1)], 1.0)
    with pytest.raises(ValueError, match="do not match"):
        gmm.GMM([0.5, 0.5], [(0, 0)], 1.0)
    with pytest.raises(ValueError, match="dimension"):
        Q.log_prob(torch.zeros(3, 3))


def test_gmm_score_and_eps_match_autograd():
    x = Q.sample(64, seed=0).requires_grad_(True)
    for abar in (None, 0.3):
        auto = torch.autograd.grad(Q.log_prob(x, abar).sum(), x)[0]
        assert torch.allclose(Q.score(x, abar), auto, atol=1e-10)
    assert torch.allclose(Q.eps(x.detach(), 0.3), -np.sqrt(0.7) * Q.score(x.detach(), 0.3))


def test_fu_target_at_largest_feasible_multiplier_is_retained_mixture():
    P = gmm.Problem("fu", Q, [Q.subset([0])], 1.0, GRID)
    cap = P.dual_domain().cap
    assert abs(cap[0] - 0.3) < 1e-3                       # the domain ends at the forget weight w_f
    p, _, _ = P.target(cap)
    retained = Q.subset([1, 2, 3]).prob(GRID.points).numpy()
    assert np.abs(p - retained).max() < 1e-3 * retained.max()
    with pytest.raises(ValueError, match="outside the FU dual domain"):
        P.target(cap + 0.01)


def test_ru_target_with_class_conditional_forget_is_esd_target():
    """q_u = q(. | c): p* ∝ q (q / q(.|c))^alpha = q / q(c | x)^alpha up to a constant (ESD, eta = alpha)."""
    lam = np.array([0.2])
    eta = lam[0] / (1 - lam[0])
    P = gmm.Problem("ru", Q, [Q.subset([0])], 1.0, GRID)
    _, logp, _ = P.target(lam)
    log_esd = Q.log_prob(GRID.points).numpy() - eta * torch.log(Q.responsibilities(GRID.points)[:, 0]).numpy()
    diff = logp - log_esd
    assert np.ptp(diff) < 1e-8                            # equal up to the normalising constant
    e_q, e_c = torch.randn(5, 2), torch.randn(5, 2)
    assert torch.allclose(targets.ru_eps(e_q, [e_c], lam), targets.esd_eps(e_q, e_c, eta))


@pytest.mark.parametrize("kind", ["ru", "fu", "lu"])
def test_closed_form_minimises_the_lagrangian(kind):
    """d(lambda) = L(p_lambda, lambda) <= L(p', lambda) for perturbed densities p'."""
    fg = [Q.subset([0]), Q.subset([3])]
    P = gmm.Problem(kind, Q, fg, [1.0, 2.0] if kind != "lu" else [0.05, 0.05], GRID)
    lam = {"ru": [0.1, 0.2], "fu": [0.1, 0.15], "lu": [2.0, 3.0]}[kind]
    p, lp, _ = P.target(lam)
    d = P.dual(lam)
    assert abs(P.lagrangian(p, lp, lam) - d) < 1e-9
    rng = np.random.default_rng(0)
    for _ in range(5):
        p2 = p * np.exp(0.3 * rng.standard_normal(p.shape))
        p2 /= p2.sum() * GRID.area
        assert P.lagrangian(p2, np.log(p2), lam) > d


def test_ru_eps_equals_score_of_closed_form_target():
    """With exact GMM eps predictions, ru_eps is -sigma times the score of q_t (q_t / q_u,t)^alpha."""
    lam = np.array([0.15, 0.1])
    fg = [Q.subset([0]), Q.subset([1])]
    abar = 0.6
    x = Q.sample(50, seed=1).requires_grad_(True)
    a = targets.ru_alpha(lam)
    logp = (1 + a.sum()) * Q.log_prob(x, abar) - sum(ai * u.log_prob(x, abar) for ai, u in zip(a, fg))
    score = torch.autograd.grad(logp.sum(), x)[0]
    eps = targets.ru_eps(Q.eps(x.detach(), abar), [u.eps(x.detach(), abar) for u in fg], lam)
    assert torch.allclose(eps, -np.sqrt(1 - abar) * score, atol=1e-10)


def test_lu_score_matches_closed_form():
    lam = [3.0]
    u = Q.subset([0])
    x = Q.sample(40, seed=2)
    s = targets.lu_score(Q.score(x), x, [u.prob], lam)
    xr = x.clone().requires_grad_(True)
    auto = torch.autograd.grad((Q.log_prob(xr) - lam[0] * u.prob(xr)).sum(), xr)[0]
    assert torch.allclose(s, auto, atol=1e-10)
    sig = torch.full((40,), 0.5, dtype=torch.float64)
    e = targets.lu_eps(-0.5 * Q.score(x), x, [u.prob], lam, sig)
    assert torch.allclose(e, -0.5 * auto, atol=1e-10)


def test_fu_loss_and_weights_agree_in_expectation():
    lam = [0.2]
    u = Q.subset([0])
    xq, xu = Q.sample(200_000, seed=3), u.sample(200_000, seed=4)
    a, c = torch.tensor([1.0, 2.0], dtype=torch.float64), 3.0
    f = lambda x: (x @ a + c) ** 2                         # any per-sample "loss"
    comp = ((Q.mu @ a + c) ** 2 + 0.25 * (a @ a)).numpy()  # E_k[f] in closed form
    exact = (comp @ Q.w.numpy() - lam[0] * comp[0]) / (1 - lam[0])   # E_{p*}[f], p* = (q - lam q_u)/(1 - lam)
    w = targets.fu_weights(Q.prob(xq), u.prob(xq)[None], lam)
    assert abs(float(targets.fu_loss(f(xq), [f(xu)], lam)) - exact) < 0.02 * exact
    assert abs(float((w * f(xq)).mean()) - exact) < 0.02 * exact
    with pytest.raises(ValueError, match="sum to < 1"):
        targets.fu_loss(f(xq), [f(xu)], [1.2])
    with pytest.raises(ValueError, match=">= 0"):
        targets.ru_alpha([-0.1])


def test_ode_log_prob_is_exact_for_exact_eps():
    x = Q.sample(300, seed=7)
    lp = gmm.ode_log_prob(Q.eps_fn(), x, steps=30)
    assert (lp - Q.log_prob(x)).abs().mean() < 0.01
