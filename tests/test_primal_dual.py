"""The primal-dual engine and exact strong duality on Gaussian mixtures (docs/mathematics.md §2)."""
import numpy as np
import pytest
import torch

from vdu import gmm
from vdu.primal_dual import DualDomain, InfeasibleConstraint, primal_dual

torch.set_num_threads(1)

Q = gmm.GMM([0.3, 0.2, 0.25, 0.25], [(-1.5, -1.5), (1.5, -1.5), (-1.5, 1.5), (1.5, 1.5)], 0.25)
GRID = gmm.Grid(6.0, 121)


def _problem(kind, forget, delta):
    """Thresholds set relative to the pretrained model's own value, so every constraint is active."""
    fg = [Q.subset([k]) for k in forget]
    ref = gmm.Problem(kind, Q, fg, np.zeros(len(fg)), GRID).reference()
    b = ref * delta if kind == "lu" else ref + delta
    return gmm.Problem(kind, Q, fg, b, GRID)


@pytest.mark.parametrize("forget", [[0], [0, 3]])
@pytest.mark.parametrize("kind,delta", [("ru", 4.0), ("fu", 1.0), ("lu", 0.3)])
def test_duality_gap_and_complementary_slackness(kind, delta, forget):
    s = _problem(kind, forget, delta).solve()
    assert (s["lam"] > 0).all()                            # active constraints
    assert abs(s["gap"]) < 1e-3
    assert s["max_violation"] < 1e-5                       # p_lambda* is primal feasible ...
    assert np.abs(s["complementary_slackness"]).max() < 1e-5   # ... and lambda_i g_i = 0


def test_dual_domain_projection_and_checks():
    d = DualDomain("ru", 2, margin=1e-3)
    lam, pinned = d.project([0.9, 0.6])
    assert abs(lam.sum() - 0.999) < 1e-12 and pinned.all() and (lam >= 0).all()
    assert np.allclose(d.project([-1.0, 0.2])[0], [0.0, 0.2])
    with pytest.raises(ValueError, match="outside the RU dual domain"):
        d.check([0.7, 0.7])
    with pytest.raises(ValueError, match="needs caps"):
        DualDomain("fu", 1)
    lam, pinned = DualDomain("fu", 1, cap=[0.3]).project([0.5])
    assert lam[0] == 0.3 and pinned[0]
    with pytest.raises(ValueError, match="expected 2 multipliers"):
        d.project([0.1])


def test_engine_satisfies_linear_constraint_with_kkt_multiplier():
    """min ||x - a||^2 s.t. c - w.x <= 0: x* = a + lam* w / 2, lam* = 2 (c - w.a) / |w|^2."""
    a, w, c = torch.tensor([0.5, -1.0]), torch.tensor([1.0, 2.0]), 2.0
    lam_star = 2 * (c - float(w @ a)) / float(w @ w)
    x = torch.zeros(2, requires_grad=True)
    fn = lambda lam: {"objective": ((x - a) ** 2).sum(), "violations": (c - w @ x).reshape(1)}
    res = primal_dual([x], fn, DualDomain("lu", 1), steps=2000, dual_every=1, dual_lr=0.02, lr=0.01,
                      seed=0, progress=False)
    assert abs(res.lam_average()[0] - lam_star) < 0.02 * lam_star
    assert abs(c - float(w.detach() @ x.detach())) < 1e-2      # final slack ~ 0
    arr = res.arrays()
    assert arr["lam"].shape == (2000, 1) and arr["violations"].shape == (2000, 1)
    assert len(res.history) == 2000 and "objective" in res.history[-1]


@pytest.mark.parametrize("kind,delta", [("lu", 0.3), ("ru", 4.0)])
def test_engine_reaches_exact_multiplier_on_grid(kind, delta):
    """The engine on the exact problem over grid densities (p = softmax(theta)) reaches lambda*."""
    P = _problem(kind, [0], delta)
    exact = P.solve()
    theta = torch.tensor(P.logq, requires_grad=True)
    logq, A = torch.tensor(P.logq), P.grid.area
    logqu, qu = torch.tensor(P.logqu), torch.tensor(P.qug)

    def fn(lam):
        lp = torch.log_softmax(theta, 0) - np.log(A)
        p = lp.exp()
        obj = (p * (lp - logq)).sum() * A
        if kind == "lu":
            g = (qu * p).sum(1) * A - torch.tensor(P.b)
        else:
            g = torch.tensor(P.b) - (p * (lp - logqu)).sum(1) * A
        return {"objective": obj, "violations": g}

    eta = {"lu": 100.0, "ru": 0.002}[kind]
    res = primal_dual([theta], fn, P.dual_domain(), steps=3000, dual_every=10, dual_lr=eta, lr=0.05,
                      seed=0, progress=False)
    lam = res.lam_average(0.3)
    assert abs(lam[0] - exact["lam"][0]) < 0.05 * exact["lam"][0], (lam, exact["lam"])


def test_infeasible_threshold_is_reported_not_looped():
    """x = tanh(theta) can never reach 2: the multiplier hits its cap with the violation positive."""
    th = torch.zeros(1, requires_grad=True)
    fn = lambda lam: {"objective": torch.tanh(th)[0] ** 2, "violations": 2 - torch.tanh(th)}
    with pytest.raises(InfeasibleConstraint, match="pinned") as e:
        primal_dual([th], fn, DualDomain("lu", 1, cap=[5.0]), steps=100_000, dual_lr=1.0, patience=20,
                    progress=False)
    assert len(e.value.result.history) < 100 and e.value.index == 0
    # RU: the dual domain sum(lambda) < 1 is bounded; an unreachable KL threshold pins lambda there
    th2 = torch.zeros(3, requires_grad=True)
    fn2 = lambda lam: {"objective": (th2 ** 2).sum(), "violations": (1e6 - (th2 ** 2).sum()).reshape(1)}
    with pytest.raises(InfeasibleConstraint):
        primal_dual([th2], fn2, DualDomain("ru", 1), steps=100_000, dual_lr=1.0, patience=10, progress=False)


def test_exact_feasibility_checks():
    with pytest.raises(InfeasibleConstraint, match="largest KL"):
        gmm.Problem("ru", Q, [Q.subset([0])], 1e4, GRID).solve()
    with pytest.raises(InfeasibleConstraint, match="not attainable"):
        gmm.Problem("fu", Q, [Q.subset([0])], 1e3, GRID).solve()
    with pytest.raises(InfeasibleConstraint, match="LU thresholds"):
        gmm.Problem("lu", Q, [Q.subset([0])], 0.0, GRID).solve()
    gmm.Problem("lu", Q, [Q.subset([0])], 0.01, GRID).check_feasible()   # feasible: no error
