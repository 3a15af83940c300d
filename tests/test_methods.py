"""The contract every registered unlearning method keeps (runs on each entry of vdu.methods.REGISTRY):
on tiny UNets, unconditional and class-conditional, two steps give a finite loss and move the weights;
the method's zero strength leaves them in place; the result saves and reloads; missing data is refused
with a message that says what is missing."""
import dataclasses
import tempfile

import pytest
import torch

from conftest import tiny_unet
from vdu.data import UnlearnData
from vdu.evaluator import Evaluator, save_evaluator
from vdu.methods import REGISTRY, get_method
from vdu.models import build_scheduler, load_model
from vdu.unlearning import unlearn

# a tiny untrained classifier for LU's concept weight (LU needs one; the contract checks the mechanics)
TINY_CLASSIFIER = str(save_evaluator(Evaluator(width=4, arch="lenet"), tempfile.mkdtemp(prefix="vdu-clf-")))
# keeps the tiny runs tiny (replay samples, Fisher and mask batches); a new method needs no entry here
SMALL = {"vdu": dict(stability="function", replay_samples=4, replay_ddim_steps=2),
         "amnesia": dict(replay_samples=4, replay_ddim_steps=2, fisher_samples=2),
         "salun": dict(mask_batches=1, mask_batch_size=4),
         "lu": dict(classifier=TINY_CLASSIFIER, dual_samples=2, sample_steps=2, dual_every=1)}
LOOP = dict(steps=2, batch_size=4, lr=1e-3, probe_every=1, probe_size=4, progress=False)


def _data(with_retain=True):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 28, 28, generator=g) * 2 - 1
    r = torch.rand(8, 1, 28, 28, generator=g) * 2 - 1
    return UnlearnData(x, retain=r if with_retain else None,
                       retain_labels=torch.tensor([0, 2, 3, 4, 5, 6, 7, 8]) if with_retain else None, forget_class=1)


def _w(m):
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def _cases():
    for name, cls in sorted(REGISTRY.items()):
        for cond in (False, True):
            if "conditional" in cls.needs and not cond:
                continue
            yield pytest.param(name, cond, id=f"{name}-{'cond' if cond else 'uncond'}")


@pytest.mark.parametrize("name,cond", list(_cases()))
def test_two_steps_move_the_weights_and_round_trip(name, cond, tmp_path):
    unet, sched = tiny_unet(conditional=cond), build_scheduler()
    out = unlearn(unet, _data(), name, sched, save_to=str(tmp_path / "m"), **LOOP, **SMALL.get(name, {}))
    log = out.unlearn_log
    assert log.stop_reason == "max_steps" and log.steps_done == 2, log.events
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in log.steps)
    assert {"loss", "forget_loss", "grad_norm"} <= set(log.steps[0])
    assert not torch.allclose(_w(out), _w(unet)), "two steps left the weights in place"
    re, _ = load_model(tmp_path / "m")
    assert torch.allclose(_w(re), _w(out), rtol=1e-3, atol=1e-4)      # stored as float16
    assert (tmp_path / "m" / "unlearn.json").exists()


@pytest.mark.parametrize("name,cond", [c for c in _cases() if get_method(c.values[0]).null_strength])
def test_zero_strength_leaves_the_model_in_place(name, cond):
    unet, sched = tiny_unet(conditional=cond), build_scheduler()
    opts = {**SMALL.get(name, {}), **get_method(name).null_strength}
    out = unlearn(unet, _data(), name, sched, **{**LOOP, "lr": 1e-2}, **opts)
    assert torch.allclose(_w(out), _w(unet), atol=1e-7)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_missing_data_is_refused(name):
    cls = get_method(name)
    sched = build_scheduler()
    if "retain" in cls.needs:
        with pytest.raises(ValueError, match=f"method '{name}' needs retain data"):
            unlearn(tiny_unet(conditional=True), _data(with_retain=False), name, sched, **LOOP)
    if "conditional" in cls.needs:
        with pytest.raises(ValueError, match="needs a class-conditional model"):
            unlearn(tiny_unet(), _data(), name, sched, **LOOP)
        with pytest.raises(ValueError, match="needs the forget class"):
            unlearn(tiny_unet(conditional=True), UnlearnData(_data().forget, retain=_data().retain), name, sched,
                    **LOOP)
    if not ({"retain", "conditional"} & set(cls.needs)):
        unlearn(tiny_unet(), _data(with_retain=False).forget, name, sched, **LOOP, **SMALL.get(name, {}))


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_config_field_is_documented_and_defaulted(name):
    cls = get_method(name)
    assert cls.name == name and dataclasses.is_dataclass(cls.Config) and cls.__doc__ or cls.__module__
    cls.Config()                                                      # every field has a default
    import inspect
    src = inspect.getsource(cls.Config)
    for f in dataclasses.fields(cls.Config):
        line = next(l for l in src.splitlines() if l.strip().startswith(f"{f.name}:"))
        assert "#" in line, f"{name}.{f.name} has no comment"


def test_retain_batches_follow_their_own_stream():
    """Methods without retain data draw the same forget batches, t and eps whether or not retain images are
    passed (a forget-only method's numbers do not depend on what else is in UnlearnData)."""
    unet, sched = tiny_unet(), build_scheduler()
    a = unlearn(unet, _data(with_retain=False), "neggrad", sched, **LOOP)
    b = unlearn(unet, _data(with_retain=True), "neggrad", sched, **LOOP)
    assert torch.equal(_w(a), _w(b))


def test_esd_moves_the_erased_prompt_towards_negative_guidance():
    """ESD's loss falls over steps: the prompt's prediction approaches the negatively guided teacher target."""
    unet, sched = tiny_unet(conditional=True), build_scheduler()
    out = unlearn(unet, _data(), "esd", sched, **{**LOOP, "steps": 20, "lr": 3e-3}, eta=1.0)
    esd = [s["esd"] for s in out.unlearn_log.steps]
    assert sum(esd[-5:]) / 5 < sum(esd[:5]) / 5, esd


def test_salun_mask_freezes_the_requested_fraction():
    unet, sched = tiny_unet(), build_scheduler()
    out = unlearn(unet, _data(), "salun", sched, sparsity=0.7, **LOOP, **{k: v for k, v in SMALL["salun"].items()})
    moved = (_w(out) != _w(unet)).float().mean().item()
    assert 0.2 < moved <= 0.31, moved


def test_siss_importance_weights_are_exact_at_the_extremes():
    """mixture = 0: every x_t comes from a retain image, so the retain weight q_r / q_mix is exactly 1 and L_r
    is the plain denoising loss of the retain images; with forget == retain images both weights are 1 and
    the two terms coincide."""
    from vdu.methods.base import Batch
    from vdu.methods.siss import SISS, SISSConfig
    unet, sched = tiny_unet(), build_scheduler()
    d = _data()
    m = SISS(unet, d, SISSConfig(mixture=0.0), sched, None)
    out = m.loss(unet, Batch(d.forget[:4], None, d.retain[:4], None, torch.Generator().manual_seed(0), 8))
    g = torch.Generator().manual_seed(0)
    from vdu.diffusion import noise_prediction_error
    t = torch.randint(0, 1000, (4,), generator=g)
    eps = torch.randn(d.retain[:4].shape, generator=g)
    ref = noise_prediction_error(unet, sched, d.retain[:4], t=t, eps=eps)[0].mean()
    assert out["L_r"].item() == pytest.approx(ref.item(), rel=1e-4)
    same = SISS(unet, d, SISSConfig(mixture=0.5), sched, None)
    out = same.loss(unet, Batch(d.retain[:4], None, d.retain[:4], None, torch.Generator().manual_seed(0), 8))
    assert out["L_f"].item() == pytest.approx(out["L_r"].item(), rel=1e-6)
