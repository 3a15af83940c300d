"""The one evaluation path (vdu.evaluation) and the notebook parameter check (vdu.notebook)."""
import pytest
import torch

from conftest import tiny_unet
from vdu.data import UnlearnData
from vdu.evaluation import EvalConfig, evaluate, measure
from vdu.models import build_scheduler
from vdu.notebook import check_params


class _Fixed(torch.nn.Module):
    """A stand-in evaluator whose label is the image's mean brightness bucket (known answers)."""

    config = {"num_classes": 10}
    num_features = 2

    def predict(self, x):
        lab = ((x.mean((1, 2, 3)) + 1) / 2 * 10).clamp(0, 9.99).long()
        return lab, torch.ones(len(x))

    def features(self, x):
        return torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3))], 1)

    def parameters(self, recurse=True):
        return iter([torch.zeros(1)])


def _imgs(levels):
    return torch.stack([torch.full((1, 28, 28), v) for v in levels])


def test_measure_counts_the_forget_class_and_pul():
    ev = _Fixed()
    before = measure(ev, _imgs([-0.85] * 4 + [0.05] * 6), UnlearnData(_imgs([0.0]), forget_class=0))
    after = measure(ev, _imgs([-0.85] * 1 + [0.05] * 9), UnlearnData(_imgs([0.0]), forget_class=0), before=before)
    assert before["forget_share"] == pytest.approx(0.4) and after["forget_share"] == pytest.approx(0.1)
    assert after["pul"] == pytest.approx(75.0)                          # (4 - 1) / 4


def test_non_finite_samples_are_refused_not_scored():
    x = _imgs([0.0] * 4)
    x[1, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        measure(_Fixed(), x, UnlearnData(_imgs([0.0]), forget_class=3))


def test_a_diverged_model_is_refused_by_the_sampler():
    unet = tiny_unet()
    with torch.no_grad():
        next(unet.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite samples"):
        evaluate(unet, build_scheduler(), _Fixed(), EvalConfig(n_samples=2, steps=2))


def test_given_samples_are_not_redrawn():
    x = _imgs([0.05] * 5)
    out, xs = evaluate(tiny_unet(), build_scheduler(), _Fixed(), EvalConfig(n_samples=5, steps=2), samples=x)
    assert xs is x and out["n_samples"] == 5


@pytest.mark.parametrize("bad", [dict(sampler="euler"), dict(n_samples=0), dict(steps=0), dict(nll_timesteps=-1)])
def test_eval_config_refuses_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        EvalConfig(**bad)


def test_check_params_names_every_bad_parameter():
    check_params(dict(n=(3, int, 1), lr=(1, float, 0)))               # an int is a fine float
    with pytest.raises(ValueError, match=r"n_forget='abc' must be int.*steps=-1 must be >= 0"):
        check_params(dict(n_forget=("abc", int, 1), steps=(-1, int, 0)))
    with pytest.raises(ValueError, match="flag=True must be int"):
        check_params(dict(flag=(True, int, 0)))
