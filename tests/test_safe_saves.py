"""Saving never loses or mispairs data: model folders are replaced only on request and atomically,
a failed save leaves the old folder as it was, and a posterior is only ever used with its own weights."""
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import CKPT, TINY, tiny_unet
from vdu.models import ModelExistsError, build_scheduler, build_unet, check_save_target, load_model, save_model
from vdu.posterior import (fingerprint, gaussian_from_checkpoints, load_posterior, make_posterior,
                           recode_posterior, save_posterior, weights_digest)


def snapshot(folder: Path) -> dict:
    """{relative path: bytes} of every file under ``folder``."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def saved(tmp_path):
    """A model folder with the sidecars a finished model carries."""
    folder = save_model(tiny_unet(seed=0), build_scheduler(), tmp_path / "m", card={"a": 1}, train={"steps": 6})
    (folder / "samples.png").write_bytes(b"png")
    (folder / "posterior.safetensors").write_bytes(b"post")
    return folder


def test_refuses_to_overwrite_a_model(saved):
    before = snapshot(saved)
    with pytest.raises(ModelExistsError, match=r"already holds a model.*overwrite=True") as e:
        save_model(tiny_unet(seed=1), build_scheduler(), saved)
    assert str(saved) in str(e.value) and isinstance(e.value, FileExistsError)
    assert snapshot(saved) == before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["m"]  # no temporary folder left


def test_overwrite_replaces_the_folder_and_drops_stale_sidecars(saved):
    new = tiny_unet(seed=1)
    out = save_model(new, build_scheduler(), saved, overwrite=True, unlearn={"b": 2})
    assert out == saved
    names = sorted(p.name for p in saved.iterdir())
    assert names == ["model_index.json", "scheduler", "unet", "unlearn.json"]  # no card/samples/posterior/train
    assert sorted(p.name for p in saved.parent.iterdir()) == ["m"]           # old and temporary folders gone
    u, _ = load_model(saved)
    assert all(torch.equal(p.half().float(), q) for p, q in zip(new.parameters(), u.parameters()))
    assert (saved.stat().st_mode & 0o777) == (saved / "unet").stat().st_mode & 0o777  # a normal folder's mode


@pytest.mark.parametrize("where", ["swap", "weights"])
def test_failed_overwrite_leaves_the_old_folder_byte_identical(saved, monkeypatch, where):
    before = snapshot(saved)
    if where == "swap":  # the second rename (new folder into place) fails, after the old one was moved aside
        import vdu.models
        monkeypatch.setattr(vdu.models, "_exchange", lambda a, b: False)   # a system without renameat2
        real, calls = os.replace, []

        def flaky(src, dst):
            calls.append((src, dst))
            if len(calls) == 2:
                raise OSError("disk gone")
            return real(src, dst)
        monkeypatch.setattr(os, "replace", flaky)
    else:  # the safetensors writer fails halfway through the weights
        import safetensors.torch

        def broken(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"half a file")
            raise OSError("no space left on device")
        monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk gone|no space"):
        save_model(tiny_unet(seed=1), build_scheduler(), saved, overwrite=True)
    monkeypatch.undo()
    assert snapshot(saved) == before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["m"]  # only the failed save's temp folder removed
    load_model(saved)


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("full")))
    with pytest.raises(OSError, match="full"):
        save_model(tiny_unet(), build_scheduler(), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_bad_targets_are_refused_before_any_work(tmp_path, monkeypatch):
    import vdu.models
    calls = []
    monkeypatch.setattr(vdu.models.UNet2DModel, "save_pretrained", lambda *a, **k: calls.append(a))
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="existing file.*folder"):
        check_save_target(f)
    with pytest.raises(NotADirectoryError, match="is a file"):
        save_model(tiny_unet(), build_scheduler(), f / "m")
    other = tmp_path / "results"
    other.mkdir()
    (other / "table.json").write_text("{}")
    with pytest.raises(FileExistsError, match="non-empty folder that holds no model"):
        save_model(tiny_unet(), build_scheduler(), other, overwrite=True)
    assert calls == [] and (other / "table.json").read_text() == "{}"
    assert check_save_target(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    (tmp_path / "empty").mkdir()
    assert check_save_target(tmp_path / "empty") == tmp_path / "empty"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_parent_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="not writable"):
            save_model(tiny_unet(), build_scheduler(), ro / "m")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_export_refuses_an_existing_model_before_loading_the_run(saved, tmp_path):
    from vdu.training import export_ema
    with pytest.raises(ModelExistsError, match="overwrite=True"):
        export_ema(tmp_path / "no-run", to=saved)        # fails on the target, not on the missing state.pt
    with pytest.raises(FileNotFoundError, match="state.pt"):
        export_ema(tmp_path / "no-run", to=saved, overwrite=True)


# ---- posterior pairing -------------------------------------------------------------------------

def _post_for(unet):
    sds = [{n: p.detach() + 1e-3 * torch.randn_like(p) for n, p in unet.named_parameters()} for _ in range(2)]
    mean, var = gaussian_from_checkpoints(sds)
    return mean, var, {n: p.detach() for n, p in unet.named_parameters()}


def test_digest_rejects_negated_and_permuted_layers(tmp_path):
    unet = tiny_unet(seed=0)
    path = save_posterior(tmp_path / "p.safetensors", *_post_for(unet), k=2, method="test")
    assert load_posterior(path, unet)["k"] == 2
    name = "conv_in.weight"
    for tamper in (lambda w: -w, lambda w: w.flip(0)):  # the old abs-sum checksum accepts both
        bad = tiny_unet(seed=0)
        with torch.no_grad():
            p = dict(bad.named_parameters())[name]
            p.copy_(tamper(p))
        before = {n: q.detach() for n, q in unet.named_parameters()}
        after = {n: q.detach() for n, q in bad.named_parameters()}
        assert fingerprint(before) == pytest.approx(fingerprint(after), rel=1e-12)
        assert weights_digest(before) != weights_digest(after)
        with pytest.raises(ValueError, match="other weights.*pretrained model it was computed from"):
            load_posterior(path, bad)


def test_digest_is_of_the_stored_float16_weights(tmp_path):
    unet = tiny_unet(seed=0)
    folder = save_model(unet, build_scheduler(), tmp_path / "m")
    loaded = load_model(folder)[0]
    a = {n: p.detach() for n, p in unet.named_parameters()}
    b = {n: p.detach() for n, p in loaded.named_parameters()}
    assert weights_digest(a) == weights_digest(b)            # float32 in memory, float16 on disk
    c = dict(b)
    c["renamed.weight"] = c.pop("conv_in.weight")
    assert weights_digest(c) != weights_digest(b)


def test_old_format_posterior_still_loads_with_a_warning(tmp_path):
    unet = tiny_unet(seed=0)
    mean, var, deployed = _post_for(unet)
    tensors = {}
    for n in mean:
        tensors[f"delta.{n}"] = (mean[n] - deployed[n]).half().contiguous()
        tensors[f"logvar.{n}"] = var[n].log().half().contiguous()
    path = tmp_path / "old.safetensors"
    save_file(tensors, path, metadata={"k": "2", "method": "snapshots", "var_floor": "1e-08",
                                       "deployed_fingerprint": repr(fingerprint(deployed))})
    with pytest.warns(UserWarning, match="old format.*sign-flipped or permuted.*--overwrite"):
        assert load_posterior(path, unet)["k"] == 2
    with pytest.raises(ValueError, match="other weights"):
        load_posterior(path, tiny_unet(seed=3))


def test_int8_posterior_is_half_the_size_and_within_half_a_step(tmp_path):
    unet = tiny_unet(seed=0)
    mean, var, deployed = _post_for(unet)
    var = {n: v * torch.exp(torch.linspace(-3, 3, v.numel()).reshape(v.shape)) for n, v in var.items()}
    f16 = save_posterior(tmp_path / "f16.safetensors", mean, var, deployed, k=2, method="test")
    i8 = save_posterior(tmp_path / "i8.safetensors", mean, var, deployed, k=2, method="test", codec="int8")
    assert i8.stat().st_size < 0.7 * f16.stat().st_size   # headers weigh on a tiny model; 0.50 on MNIST's
    post = load_posterior(i8, unet)
    for n in mean:
        delta, logvar = mean[n] - deployed[n], var[n].clamp_min(1e-8).log()   # the floor the file applies
        step = (logvar.max() - logvar.min()) / 255
        assert (post["var"][n].log() - logvar).abs().max() <= step / 2 + 1e-5
        assert (post["mean"][n] - mean[n]).abs().max() <= delta.abs().max() / 254 + 1e-6
    with pytest.raises(ValueError, match="other weights"):
        load_posterior(i8, tiny_unet(seed=3))
    recoded = load_posterior(recode_posterior(f16, unet, "int8"), unet)   # float16 -> int8 in place
    assert abs(f16.stat().st_size - i8.stat().st_size) < 0.02 * i8.stat().st_size   # int8 now (header aside)
    for n in mean:    # within one step of encoding the float32 statistics directly (float16 rounding first)
        step = (var[n].clamp_min(1e-8).log().max() - var[n].clamp_min(1e-8).log().min()) / 255
        assert (recoded["var"][n].log() - post["var"][n].log()).abs().max() <= step + 0.01   # float16 at |x|<32: 0.008
    with pytest.raises(ValueError, match="codec"):
        save_posterior(tmp_path / "x.safetensors", mean, var, deployed, k=2, method="test", codec="int2")
    for n in mean:
        assert (recoded["mean"][n] - mean[n]).abs().max() <= (mean[n] - deployed[n]).abs().max() / 254 + 2e-6


def test_int8_posterior_refuses_bad_statistics_and_mislabelled_files(tmp_path):
    from safetensors import safe_open
    unet = tiny_unet(seed=0)
    mean, var, deployed = _post_for(unet)
    name = "conv_in.weight"
    const = {**var, name: torch.full_like(var[name], 3e-6)}             # an all-equal variance decodes exactly
    post = load_posterior(save_posterior(tmp_path / "c.safetensors", deployed, const, deployed, 2, "t", "int8"), unet)
    assert torch.allclose(post["var"][name], const[name], rtol=1e-5) and torch.equal(post["mean"][name], deployed[name])
    for bad in (float("nan"), float("inf")):
        broken = {**mean, name: mean[name].clone().index_fill_(0, torch.tensor([0]), bad)}
        for codec in ("float16", "int8"):
            with pytest.raises(ValueError, match="not finite"):
                save_posterior(tmp_path / "n.safetensors", broken, var, deployed, 2, "t", codec)
    path = save_posterior(tmp_path / "i8.safetensors", mean, var, deployed, 2, "t", "int8")
    with safe_open(path, "pt") as f:
        meta, flat = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(flat, tmp_path / "nolabel.safetensors", metadata={k: v for k, v in meta.items() if k != "codec"})
    with pytest.raises(ValueError, match="no statistics for parameter"):   # read as float16: refused, not misread
        load_posterior(tmp_path / "nolabel.safetensors", unet)
    save_file({k: v for k, v in flat.items() if not k.startswith("qparams.")}, tmp_path / "noq.safetensors",
              metadata=meta)
    with pytest.raises(ValueError, match="corrupt.*qparams"):
        load_posterior(tmp_path / "noq.safetensors", unet)
    save_file({**flat, f"delta_i8.{name}": flat[f"delta_i8.{name}"].float()}, tmp_path / "dtype.safetensors",
              metadata=meta)
    with pytest.raises(ValueError, match="corrupt.*int8 statistics expected"):
        load_posterior(tmp_path / "dtype.safetensors", unet)
    save_file(flat, tmp_path / "future.safetensors", metadata={**meta, "codec": "int2"})
    with pytest.raises(ValueError, match="codec 'int2'"):
        load_posterior(tmp_path / "future.safetensors", unet)


def test_int4_posteriors_are_a_quarter_and_an_eighth_with_errors_relative_to_sigma(tmp_path):
    """int4: log sigma*^2 within half of 1/15 of each tensor's range, the mean within half a z-step of sigma*
    (odd-sized tensors included: two values per byte); int4-var: the variance alone, which serves the centre
    theta* and refuses the centre 'mean'; the packed files refuse other architectures and truncated bytes."""
    from safetensors import safe_open
    from vdu.methods.vdu import StabilityRegularizer
    unet = tiny_unet(seed=0)
    mean, var, deployed = _post_for(unet)
    var = {n: v * torch.exp(torch.linspace(-3, 3, v.numel()).reshape(v.shape)) for n, v in var.items()}
    assert any(v.numel() % 2 for v in var.values())                       # an odd tensor is packed too
    f16 = save_posterior(tmp_path / "f16.safetensors", mean, var, deployed, k=2, method="test")
    i4 = save_posterior(tmp_path / "i4.safetensors", mean, var, deployed, k=2, method="test", codec="int4")
    v4 = save_posterior(tmp_path / "v4.safetensors", mean, var, deployed, k=2, method="test", codec="int4-var")
    n_params = sum(v.numel() for v in var.values())
    assert i4.stat().st_size - v4.stat().st_size >= n_params // 2          # the mean: half a byte per parameter
    assert v4.stat().st_size < i4.stat().st_size < 0.5 * f16.stat().st_size
    post, only_var = load_posterior(i4, unet), load_posterior(v4, unet)
    for n in mean:
        logvar = var[n].clamp_min(1e-8).log()
        step = (logvar.max() - logvar.min()) / 15
        assert (post["var"][n].log() - logvar).abs().max() <= step / 2 + 1e-5
        assert torch.equal(post["var"][n], only_var["var"][n])
        z = (mean[n] - deployed[n]) / post["var"][n].sqrt()                  # offsets in the decoded sigma
        zerr = (post["mean"][n] - mean[n]) / post["var"][n].sqrt()
        assert zerr.abs().max() <= z.abs().max() / 14 + 1e-4
    assert only_var["mean"] is None
    moved = tiny_unet(seed=0)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(1e-3)
    b_full = StabilityRegularizer(unet, post, center="deployed")(moved)
    b_var = StabilityRegularizer(unet, only_var, center="deployed")(moved)
    assert torch.allclose(b_full, b_var)                                 # same variance, same centre theta*
    with pytest.raises(ValueError, match="no checkpoint mean.*center='deployed'"):
        StabilityRegularizer(unet, only_var, center="mean")
    with pytest.raises(ValueError, match="stores no mean.*int4-var"):     # nothing to write a mean from
        recode_posterior(v4, unet, "int8")
    with pytest.raises(ValueError, match="packed bytes there but"):
        load_posterior(i4, build_unet("mnist", False, **{**TINY, "block_out_channels": (8, 24)}))
    with safe_open(i4, "pt") as f:
        meta, flat = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = "conv_in.weight"
    save_file({**flat, f"delta_i4.{name}": flat[f"delta_i4.{name}"][:-1].contiguous()}, tmp_path / "cut.safetensors",
              metadata=meta)
    with pytest.raises(ValueError, match="corrupt.*int4 statistics expected"):
        load_posterior(tmp_path / "cut.safetensors", unet)
    recoded = load_posterior(recode_posterior(f16, unet, "int4"), unet)   # float16 -> int4 in place
    for n in mean:
        step = (var[n].clamp_min(1e-8).log().max() - var[n].clamp_min(1e-8).log().min()) / 15
        assert (recoded["var"][n].log() - post["var"][n].log()).abs().max() <= step + 0.01


def test_cli_recodes_a_posterior_only_when_told_how_and_allowed(tmp_path, capsys):
    from vdu.__main__ import main
    unet = tiny_unet(seed=0)
    folder = save_model(unet, build_scheduler(), tmp_path / "m")
    path = save_posterior(folder / "posterior.safetensors", *_post_for(unet), k=2, method="test")
    before = path.read_bytes()
    for argv in (["--recode", "--overwrite"], ["--recode", "--codec", "int8"]):
        with pytest.raises(SystemExit):
            main(["posterior", str(folder), *argv])
        assert path.read_bytes() == before                            # refused: the file is untouched
    main(["posterior", str(folder), "--recode", "--codec", "int8", "--overwrite"])
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        assert f.metadata()["codec"] == "int8" and "recoded from float16" in f.metadata()["provenance"]
    assert path.stat().st_size < len(before) and load_posterior(path, unet)["k"] == 2


def test_committed_posterior_still_loads():
    unet, _ = load_model(CKPT / "ddpm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # old format: a warning, not an error
        post = load_posterior(CKPT / "ddpm" / "posterior.safetensors", unet)
    assert post["k"] >= 2


def _run_with_snapshots(run: Path, unet, seed: int = 0, config: dict | None = None, k: int = 3):
    (run / "snapshots").mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    for step in range(1, k + 1):
        save_file({n: (p.detach() + 1e-3 * torch.randn(p.shape, generator=g)).contiguous()
                   for n, p in unet.state_dict().items()}, run / "snapshots" / f"step_{step:07d}.safetensors")
    if config is not None:
        (run / "config.json").write_text(json.dumps(config))


def test_make_posterior_checks_snapshots_and_refuses_to_overwrite(tmp_path):
    from conftest import TINY
    from vdu.models import build_unet
    cfg = {"dataset": "mnist", "conditional": False, "seed": 0, "batch_size": 16, "model_overrides": TINY,
           "init": None}
    unet = tiny_unet(seed=0)
    model = save_model(unet, build_scheduler(), tmp_path / "model", train={"config": cfg, "steps": 3})
    _run_with_snapshots(tmp_path / "run", unet, config=cfg)
    path = make_posterior(model, tmp_path / "run", k=3, progress=False)
    assert load_posterior(path, load_model(model)[0])["k"] == 3
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="already exists.*overwrite=True"):
        make_posterior(model, tmp_path / "run", k=3, progress=False)
    assert path.read_bytes() == before
    assert make_posterior(model, tmp_path / "run", k=3, progress=False, overwrite=True) == path

    # snapshots of another (independently initialised) model with the same architecture and no config
    _run_with_snapshots(tmp_path / "other", tiny_unet(seed=5))
    with pytest.raises(ValueError, match="do not belong to the model.*Pass the run folder that trained"):
        make_posterior(model, tmp_path / "other", k=3, out=tmp_path / "x.safetensors", progress=False)
    # a run whose config says it is another run
    _run_with_snapshots(tmp_path / "seed1", unet, config={**cfg, "seed": 1})
    with pytest.raises(ValueError, match="another run.*seed=1.*Pass the run folder"):
        make_posterior(model, tmp_path / "seed1", k=3, out=tmp_path / "x.safetensors", progress=False)
    # snapshots of another architecture
    _run_with_snapshots(tmp_path / "arch", build_unet("mnist", **{**TINY, "block_out_channels": (16, 32)}))
    with pytest.raises(ValueError, match="different architecture.*Pass the run folder"):
        make_posterior(model, tmp_path / "arch", k=3, out=tmp_path / "x.safetensors", progress=False)
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_posterior_and_export_flags(tmp_path, capsys):
    from vdu.__main__ import main
    unet = tiny_unet(seed=0)
    model = save_model(unet, build_scheduler(), tmp_path / "model")
    _run_with_snapshots(tmp_path / "run", unet)
    assert main(["posterior", str(model), "--run-dir", str(tmp_path / "run"), "--k", "3"]) == 0
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(["posterior", str(model), "--run-dir", str(tmp_path / "run"), "--k", "3"])
    assert main(["posterior", str(model), "--run-dir", str(tmp_path / "run"), "--k", "3", "--overwrite"]) == 0
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "run"), "--to", str(model)])
    assert "--overwrite" in capsys.readouterr().err


def test_continuations_are_reused_without_re_exporting(tmp_path):
    from conftest import TINY
    from vdu.training import TrainConfig
    from dataclasses import asdict
    cfg = asdict(TrainConfig(batch_size=8, max_train=16, model_overrides=TINY, out=str(tmp_path / "run")))
    model = save_model(tiny_unet(seed=0), build_scheduler(), tmp_path / "model", train={"config": cfg, "steps": 0})
    work = tmp_path / "work"
    kw = dict(method="continuations", continuation_steps=2, continuation_lr=1e-3, progress=False, work_dir=work)
    make_posterior(model, k=2, out=tmp_path / "k2.safetensors", **kw)
    first = (work / "continuation0" / "state.pt").stat().st_mtime_ns
    post = load_posterior(make_posterior(model, k=3, out=tmp_path / "k3.safetensors", **kw), load_model(model)[0])
    assert post["k"] == 3 and (work / "continuation0" / "state.pt").stat().st_mtime_ns == first
