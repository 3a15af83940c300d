import pytest
import torch

from conftest import tiny_unet
from vdu.models import build_scheduler
from vdu.diffusion import sample


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_seed_bank_is_independent_of_batch_size(method):
    u, s = tiny_unet(), build_scheduler()
    a = sample(u, s, 6, seed=3, method=method, steps=4, batch_size=6, progress=False)
    b = sample(u, s, 6, seed=3, method=method, steps=4, batch_size=4, progress=False)
    c = sample(u, s, 6, seed=4, method=method, steps=4, batch_size=6, progress=False)
    assert a.shape == (6, 1, 28, 28) and a.min() >= -1 and a.max() <= 1
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, c)


def test_two_models_share_the_bank_start_noise():
    s = build_scheduler()
    # with one DDIM step from T the output is a deterministic function of x_T and the model
    u1, u2 = tiny_unet(seed=0), tiny_unet(seed=1)
    a1 = sample(u1, s, 4, seed=0, steps=1, progress=False)
    assert torch.equal(a1, sample(u1, s, 4, seed=0, steps=1, progress=False))
    assert not torch.equal(a1, sample(u2, s, 4, seed=0, steps=1, progress=False))


def test_conditional_and_guidance():
    u, s = tiny_unet(conditional=True), build_scheduler()
    x0 = sample(u, s, 4, class_labels=3, steps=3, progress=False)
    x1 = sample(u, s, 4, class_labels=3, guidance=2.0, steps=3, progress=False)
    xn = sample(u, s, 4, steps=3, progress=False)  # null class
    assert not torch.allclose(x0, x1) and not torch.allclose(x0, xn)
    with pytest.raises(ValueError, match="class_labels"):
        sample(u, s, 4, class_labels=10, steps=2, progress=False)
    with pytest.raises(ValueError, match="unconditional"):
        sample(tiny_unet(), s, 2, class_labels=1, steps=2, progress=False)
    with pytest.raises(ValueError, match="method"):
        sample(u, s, 2, method="euler", progress=False)
