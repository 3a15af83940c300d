"""Bad inputs and faults at every public entry point.

Each table row is one bad input: the call must raise the given exception type with a message that
names the problem (the regex). The resume and kill tests check that a corrupt checkpoint, a changed
config and a ``kill -9`` never cost more than the steps since the previous checkpoint, and never leave
a half-written model folder where a model is expected."""
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY, tiny_train_config, tiny_unet
from vdu.data import ImageData, UnlearnData, load_dataset
from vdu.diffusion import nll_bits_per_dim, sample
from vdu.evaluation import EvalConfig
from vdu.evaluator import Evaluator
from vdu.metrics import class_histogram, domain_fid
from vdu.models import ModelExistsError, build_scheduler, holds_model, load_model, save_model
from vdu.training import ConfigError, TrainConfig, export_ema, pretrain
from vdu.unlearning import unlearn

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@cache
def unc():
    return tiny_unet()


@cache
def cond():
    return tiny_unet(conditional=True)


@cache
def evaluator():
    torch.manual_seed(0)
    return Evaluator(1, 10, 28, width=8).eval()


def imgs(n=8, c=1, s=28):
    return torch.rand(n, c, s, s, generator=torch.Generator().manual_seed(0)) * 2 - 1


def nan_imgs():
    x = imgs()
    x[3, 0, 5, 5] = float("nan")
    return x


SCHED = build_scheduler()
U = dict(steps=1, batch_size=4, probe_every=0, progress=False)


def _unlearn(data, method="neggrad", model=unc, **kw):
    return lambda tmp: unlearn(model(), data, method, SCHED, **{**U, **kw})


def _tiny_data(n=32):
    return ImageData(imgs(n), torch.arange(n) % 10, [str(i) for i in range(10)], "tiny")


def _pretrain(**kw):
    def run(tmp):
        cfg = TrainConfig(**{**dict(steps=2, batch_size=4, warmup=1, checkpoint_every=1, log_every=1,
                                    k_snapshots=1, snapshot_every=1, out=str(tmp / "run"), model_overrides=TINY), **kw})
        return pretrain(cfg, data=_tiny_data(), progress=False)
    return run


def _file(tmp):
    (tmp / "afile").write_text("x")
    return tmp / "afile"


def _model(tmp):
    return save_model(tiny_unet(), SCHED, tmp / "m")


def _nonempty(tmp):
    (tmp / "results").mkdir()
    (tmp / "results" / "table.json").write_text("{}")
    return tmp / "results"


def _garbage_state(tmp):
    (tmp / "run").mkdir()
    (tmp / "run" / "state.pt").write_bytes(b"PK\x03\x04 truncated")
    return tmp / "run"


class FakeEvaluator:
    """Duck-typed evaluator that would label anything class 0 (the NaN-image hazard)."""
    config = {"num_classes": 10}

    def predict(self, x):
        return torch.zeros(len(x), dtype=torch.long), torch.ones(len(x))


def F255():
    """Float images in [0, 255] (a forgotten conversion)."""
    x = (imgs() + 1) * 127.5
    x[0, 0, 0, :2] = torch.tensor([0.0, 255.0])
    return x


I8 = lambda: F255().round().to(torch.uint8)

ROWS = [
    # ---- unlearn --------------------------------------------------------------------------------
    ("unlearn: unknown method", _unlearn(imgs(), "nope"), ValueError, r"unknown unlearning method 'nope'; known"),
    ("unlearn: option of another method", _unlearn(imgs(), gamma=0.5), TypeError,
     r"option 'gamma' belongs to method\(s\) \['vdu'\], not to 'neggrad'"),
    ("unlearn: unknown option", _unlearn(imgs(), stepz=3), TypeError, r"unknown unlearn option 'stepz'"),
    ("unlearn: uint8 images", _unlearn(I8()), ValueError, r"dtype torch.uint8.*to_tensor"),
    ("unlearn: [0, 255] float images", _unlearn(F255()), ValueError, r"values in \[0, 255\].*x / 127.5 - 1"),
    ("unlearn: NaN image", _unlearn(nan_imgs()), ValueError, r"NaN or inf"),
    ("unlearn: empty forget set", _unlearn(torch.empty(0, 1, 28, 28)), ValueError, r"forget set is empty"),
    ("unlearn: wrong channels", _unlearn(imgs(c=3)), ValueError, r"\(3, 28, 28\) do not match the model.*\(1, 28, 28\)"),
    ("unlearn: wrong size", _unlearn(imgs(s=32)), ValueError, r"\(1, 32, 32\) do not match the model"),
    ("unlearn: 3-d tensor", _unlearn(imgs()[:, 0]), ValueError, r"must have shape \(N, C, H, W\)"),
    ("unlearn: a list, not a tensor", _unlearn([[0.0]]), TypeError, r"must be an ImageData or an \(N, C, H, W\) tensor"),
    ("unlearn: negative steps", _unlearn(imgs(), steps=-1), ValueError, r"steps must be >= 0, got -1"),
    ("unlearn: batch_size 0", _unlearn(imgs(), batch_size=0), ValueError, r"batch_size must be >= 1, got 0"),
    ("unlearn: lr 0", _unlearn(imgs(), lr=0.0), ValueError, r"lr must be a finite number > 0, got 0.0"),
    ("unlearn: float steps", _unlearn(imgs(), steps=2.5), TypeError, r"steps must be an integer, got 2.5"),
    ("unlearn: unknown optimizer", _unlearn(imgs(), optimizer="adam"), ValueError, r"optimizer must be one of"),
    ("unlearn: retain method without retain", _unlearn(imgs(), "finetune"), ValueError,
     r"'finetune' needs retain data \(D_r\).*forget-only methods"),
    ("unlearn: ESD on an unconditional model", _unlearn(UnlearnData(imgs(), forget_class=1), "esd"), ValueError,
     r"'esd' .*needs a class-conditional model"),
    ("unlearn: ESD without forget class", _unlearn(imgs(), "esd", model=cond), ValueError,
     r"'esd' needs the forget class.*forget_class=c"),
    ("unlearn: forget_class out of range", _unlearn(UnlearnData(imgs(), forget_class=10), model=cond), ValueError,
     r"forget_class 10 is not a class of this model \(0..9\)"),
    ("unlearn: negative forget_class", lambda tmp: UnlearnData(imgs(), forget_class=-1), ValueError,
     r"forget_class must be a class id >= 0, got -1"),
    ("unlearn: vdu without posterior", _unlearn(imgs(), "vdu"), ValueError, r"needs the K-checkpoint posterior"),
    ("unlearn: eval_every without evaluator", _unlearn(imgs(), eval_every=5), ValueError,
     r"eval_every > 0 needs evaluator="),
    ("unlearn: save_to an existing file", lambda tmp: unlearn(unc(), imgs(), "neggrad", SCHED, save_to=str(_file(tmp)), **U),
     NotADirectoryError, r"existing file, not a folder"),
    ("unlearn: save_to an existing model", lambda tmp: unlearn(unc(), imgs(), "neggrad", SCHED, save_to=str(_model(tmp)), **U),
     ModelExistsError, r"already holds a model.*overwrite=True"),
    # ---- pretrain / TrainConfig ----------------------------------------------------------------
    ("pretrain: batch_size 0", _pretrain(batch_size=0), ConfigError, r"batch_size must be an integer >= 1, got 0"),
    ("pretrain: steps 0", _pretrain(steps=0), ConfigError, r"steps must be an integer >= 1, got 0"),
    ("pretrain: float steps", _pretrain(steps=2.5), ConfigError, r"steps must be an integer >= 1, got 2.5"),
    ("pretrain: checkpoint_every 0", _pretrain(checkpoint_every=0), ConfigError, r"checkpoint_every must be an integer >= 1"),
    ("pretrain: log_every 0", _pretrain(log_every=0), ConfigError, r"log_every must be an integer >= 1"),
    ("pretrain: k_snapshots -1", _pretrain(k_snapshots=-1), ConfigError, r"k_snapshots must be an integer >= 0"),
    ("pretrain: snapshot_every 0", _pretrain(snapshot_every=0), ConfigError, r"snapshot_every must be an integer >= 1"),
    ("pretrain: warmup -1", _pretrain(warmup=-1), ConfigError, r"warmup must be an integer >= 0"),
    ("pretrain: lr 0", _pretrain(lr=0.0), ConfigError, r"lr must be a number > 0, got 0.0"),
    ("pretrain: lr nan", _pretrain(lr=float("nan")), ConfigError, r"lr must be a number > 0, got nan"),
    ("pretrain: cond_drop 1", _pretrain(cond_drop=1.0), ConfigError, r"cond_drop must be in \[0, 1\)"),
    ("pretrain: ema_decay 1", _pretrain(ema_decay=1.0), ConfigError, r"ema_decay must be in \(0, 1\)"),
    ("pretrain: ema_decay 0", _pretrain(ema_decay=0.0), ConfigError, r"ema_decay must be in \(0, 1\)"),
    ("pretrain: ema_warmup 'no'", _pretrain(ema_warmup="no"), ConfigError, r"ema_warmup must be True or False, got 'no'"),
    ("pretrain: conditional 1", _pretrain(conditional=1), ConfigError, r"conditional must be True or False, got 1"),
    ("pretrain: lr_final_frac 2", _pretrain(lr_final_frac=2.0), ConfigError, r"lr_final_frac must be in \[0, 1\]"),
    ("pretrain: grad_clip 0", _pretrain(grad_clip=0.0), ConfigError, r"grad_clip must be a number > 0"),
    ("pretrain: weight_decay -1", _pretrain(weight_decay=-1.0), ConfigError, r"weight_decay must be a number >= 0"),
    ("pretrain: max_train below batch_size", _pretrain(max_train=2), ConfigError,
     r"max_train must be None \(all training images\) or an integer >= batch_size \(4\), got 2"),
    ("pretrain: unknown dataset", _pretrain(dataset="imagenet"), ConfigError, r"dataset must be one of \['cifar10'"),
    ("pretrain: fewer images than a batch", _pretrain(batch_size=64), ValueError,
     r"32 training images is fewer than one batch of 64"),
    ("export: no state.pt", lambda tmp: export_ema(tmp / "none", to=tmp / "m"), FileNotFoundError,
     r"state.pt not found: nothing to export"),
    ("export: corrupt state.pt", lambda tmp: export_ema(_garbage_state(tmp), to=tmp / "m"), ValueError,
     r"state.pt cannot be loaded .*truncated or corrupt.*Resume the run"),
    ("pretrain: corrupt state.pt, no state.prev.pt", lambda tmp: (_garbage_state(tmp), _pretrain()(tmp)), ValueError,
     r"state.pt cannot be loaded .*no state.prev.pt to fall back to\. Delete .* or start a new run"),
    # ---- ImageData.take / split, load_dataset --------------------------------------------------
    ("take: n < 0", lambda tmp: _tiny_data().take(-1), ValueError, r"n must be a whole number of images >= 0.*got -1"),
    ("take: float n", lambda tmp: _tiny_data().take(2.5), ValueError, r"n must be a whole number.*got 2.5"),
    ("take: bool n", lambda tmp: _tiny_data().take(True), ValueError, r"n must be a whole number.*got True"),
    ("take: n and fraction", lambda tmp: _tiny_data().take(3, fraction=0.5), ValueError, r"pass n or fraction, not both"),
    ("take: fraction 0", lambda tmp: _tiny_data().take(fraction=0), ValueError, r"fraction must be in \(0, 1\], got 0"),
    ("take: fraction 1.5", lambda tmp: _tiny_data().take(fraction=1.5), ValueError, r"fraction must be in \(0, 1\]"),
    ("split: no classes", lambda tmp: _tiny_data().split([]), ValueError, r"no forget classes given"),
    ("split: class out of range", lambda tmp: _tiny_data().split(10), ValueError, r"class id 10 out of range.*0..9"),
    ("split: unknown class name", lambda tmp: _tiny_data().split("cat"), ValueError, r"unknown class 'cat'"),
    ("split: float class", lambda tmp: _tiny_data().split([1.5]), TypeError, r"class 1.5 must be an integer id or a class name"),
    ("ImageData: labels mismatch", lambda tmp: ImageData(imgs(4), torch.zeros(3), ["a"]), ValueError,
     r"4 images but 3 labels"),
    ("load_dataset: unknown name", lambda tmp: load_dataset("imagenet"), ValueError,
     r"unknown dataset 'imagenet'; known datasets"),
    ("load_dataset: bad split", lambda tmp: load_dataset("mnist", "valid"), ValueError,
     r"split must be 'train' or 'test', got 'valid'"),
    ("load_dataset: missing file", lambda tmp: load_dataset("cifar10", root=tmp), FileNotFoundError,
     r"cifar10.npz not found: put cifar10.npz there \(or set \$VDU_DATA / pass root=.*download=True"),
    # ---- sample ---------------------------------------------------------------------------------
    ("sample: n 0", lambda tmp: sample(unc(), SCHED, 0, progress=False), ValueError, r"need n >= 1 samples.*n=0"),
    ("sample: steps 0", lambda tmp: sample(unc(), SCHED, 2, steps=0, progress=False), ValueError,
     r"steps >= 1.*steps=0"),
    ("sample: unknown method", lambda tmp: sample(unc(), SCHED, 2, method="euler", progress=False), ValueError,
     r"method must be one of \('ddim', 'ddpm', 'dpm'\), got 'euler'"),
    ("sample: class_labels on an unconditional model", lambda tmp: sample(unc(), SCHED, 2, class_labels=1, progress=False),
     ValueError, r"class_labels given but the model is unconditional"),
    ("sample: class_labels out of range", lambda tmp: sample(cond(), SCHED, 2, class_labels=10, progress=False),
     ValueError, r"class_labels must be 2 ids in \[0, 9\]"),
    # ---- nll_bits_per_dim (vdu.models.check_images) ---------------------------------------------
    ("nll: uint8 images", lambda tmp: nll_bits_per_dim(unc(), SCHED, I8(), progress=False), ValueError,
     r"dtype torch.uint8.*vdu.data.to_tensor"),
    ("nll: [0, 255] float images", lambda tmp: nll_bits_per_dim(unc(), SCHED, F255(), progress=False), ValueError,
     r"values in \[0, 255\], outside \[-1, 1\].*x / 127.5 - 1"),
    ("nll: [0, 2] images", lambda tmp: nll_bits_per_dim(unc(), SCHED, imgs() + 1.01, progress=False), ValueError,
     r"outside \[-1, 1\].*from \[0, 1\]: x \* 2 - 1"),
    ("nll: NaN image", lambda tmp: nll_bits_per_dim(unc(), SCHED, nan_imgs(), progress=False), ValueError,
     r"contain NaN or inf"),
    ("nll: inf image", lambda tmp: nll_bits_per_dim(unc(), SCHED, imgs().index_fill(0, torch.tensor([1]), float("inf")),
                                                      progress=False), ValueError, r"contain NaN or inf"),
    ("nll: numpy array", lambda tmp: nll_bits_per_dim(unc(), SCHED, imgs().numpy(), progress=False), TypeError,
     r"must be a torch tensor.*got ndarray"),
    ("nll: empty", lambda tmp: nll_bits_per_dim(unc(), SCHED, torch.empty(0, 1, 28, 28), progress=False), ValueError,
     r"are empty"),
    ("nll: wrong shape", lambda tmp: nll_bits_per_dim(unc(), SCHED, imgs(c=3), progress=False), ValueError,
     r"do not match the model"),
    ("nll: timesteps 0", lambda tmp: nll_bits_per_dim(unc(), SCHED, imgs(), timesteps=0, progress=False), ValueError,
     r"timesteps must be None .* or an integer >= 1"),
    ("nll: class_labels on an unconditional model",
     lambda tmp: nll_bits_per_dim(unc(), SCHED, imgs(), class_labels=torch.zeros(8, dtype=torch.long), progress=False),
     ValueError, r"class_labels given but the model is unconditional"),
    ("nll: conditional model without class_labels", lambda tmp: nll_bits_per_dim(cond(), SCHED, imgs(), progress=False),
     ValueError, r"class-conditional: pass class_labels.*null class"),
    ("nll: class_labels of the wrong length",
     lambda tmp: nll_bits_per_dim(cond(), SCHED, imgs(), class_labels=torch.zeros(3, dtype=torch.long), progress=False),
     ValueError, r"class_labels must be 8 integer ids in \[0, 10\]"),
    # ---- class_histogram / Evaluator.predict / domain FID ---------------------------------------
    ("class_histogram: NaN image", lambda tmp: class_histogram(evaluator(), nan_imgs()), ValueError, r"NaN or inf"),
    ("class_histogram: NaN image, duck-typed evaluator", lambda tmp: class_histogram(FakeEvaluator(), nan_imgs()),
     ValueError, r"NaN or inf"),
    ("class_histogram: uint8 images", lambda tmp: class_histogram(evaluator(), I8()), ValueError, r"dtype torch.uint8"),
    ("class_histogram: [0, 255] images", lambda tmp: class_histogram(evaluator(), F255()), ValueError,
     r"values in \[0, 255\].*x / 127.5 - 1"),
    ("class_histogram: empty", lambda tmp: class_histogram(evaluator(), torch.empty(0, 1, 28, 28)), ValueError, r"empty"),
    ("class_histogram: threshold 2", lambda tmp: class_histogram(evaluator(), imgs(), threshold=2), ValueError,
     r"threshold is a softmax probability in \[0, 1\]"),
    ("predict: NaN image", lambda tmp: evaluator().predict(nan_imgs()), ValueError, r"NaN or inf"),
    ("predict: wrong shape", lambda tmp: evaluator().predict(imgs(c=3, s=32)), ValueError,
     r"evaluator expects images of shape \(N, 1, 28, 28\)"),
    ("predict: batch_size 0", lambda tmp: evaluator().predict(imgs(), batch_size=0), ValueError,
     r"batch_size must be an integer >= 1"),
    ("domain_fid: NaN fake images", lambda tmp: domain_fid(evaluator(), nan_imgs(), imgs()), ValueError,
     r"fake images contain NaN or inf"),
    ("domain_fid: one image", lambda tmp: domain_fid(evaluator(), imgs(1), imgs()), ValueError,
     r"at least 2 images on each side"),
    # ---- EvalConfig -----------------------------------------------------------------------------
    ("EvalConfig: unknown sampler", lambda tmp: EvalConfig(sampler="euler"), ValueError,
     r"sampler must be one of .*got 'euler'"),
    ("EvalConfig: n_samples 0", lambda tmp: EvalConfig(n_samples=0), ValueError, r"need n_samples >= 1"),
    ("EvalConfig: steps 0", lambda tmp: EvalConfig(steps=0), ValueError, r"steps >= 1"),
    # ---- save_model targets ---------------------------------------------------------------------
    ("save_model: target is a file", lambda tmp: save_model(unc(), SCHED, _file(tmp)), NotADirectoryError,
     r"existing file, not a folder"),
    ("save_model: parent is a file", lambda tmp: save_model(unc(), SCHED, _file(tmp) / "m"), NotADirectoryError,
     r"afile is a file, not a folder"),
    ("save_model: existing model", lambda tmp: save_model(unc(), SCHED, _model(tmp)), ModelExistsError,
     r"already holds a model; refusing to overwrite it\. Pass overwrite=True"),
    ("save_model: non-empty folder", lambda tmp: save_model(unc(), SCHED, _nonempty(tmp), overwrite=True),
     FileExistsError, r"non-empty folder that holds no model"),
]


@pytest.mark.parametrize("call, exc, pattern", [pytest.param(*r[1:], id=r[0]) for r in ROWS])
def test_bad_input_raises_and_names_the_problem(call, exc, pattern, tmp_path):
    with pytest.raises(exc, match=pattern):
        call(tmp_path)


CLI_ROWS = [
    (["pretrain", "--batch-size", "0"], r"argument --batch-size: batch_size must be an integer >= 1, got 0"),
    (["pretrain", "--checkpoint-every", "0"], r"argument --checkpoint-every: checkpoint_every must be an integer >= 1"),
    (["pretrain", "--steps", "-5"], r"argument --steps: steps must be an integer >= 1"),
    (["pretrain", "--lr", "0"], r"argument --lr: lr must be a number > 0"),
    (["pretrain", "--ema-decay", "1"], r"argument --ema-decay: ema_decay must be in \(0, 1\)"),
    (["pretrain", "--max-train", "3"], r"argument --max-train: max_train must be None .* >= batch_size \(64\)"),
    (["pretrain", "--dataset", "imagenet"], r"argument --dataset: dataset must be one of"),
    (["pretrain", "--batch-size", "abc"], r"argument --batch-size: must be an integer, got 'abc'"),
    (["pretrain", "--model-overrides", "[32]"], r"argument --model-overrides: must be a JSON object"),
    (["pretrain", "--model-overrides", "{channels: 3}"], r"argument --model-overrides: must be a JSON object, got"),
    (["pretrain", "--model-overrides", '{"widths": [32]}'], r"argument --model-overrides: model_overrides must be "
                                                              r"UNet2DModel keyword arguments; unknown: \['widths'\]"),
    (["card", "model", "--evaluator", "ev", "--n", "0"], r"argument --n: must be an integer >= 2, got 0"),
    (["card", "model", "--evaluator", "ev", "--steps", "0"], r"argument --steps: must be an integer >= 1, got 0"),
    (["card", "model", "--evaluator", "ev", "--nll-images", "-1"], r"argument --nll-images: must be an integer >= 1"),
    (["evaluator", "--out", "x", "--epochs", "0"], r"argument --epochs: must be an integer >= 1, got 0"),
    (["evaluator", "--out", "x", "--lr", "0"], r"argument --lr: must be a finite number > 0"),
    (["evaluator", "--out", "x", "--dataset", "imagenet"], r"argument --dataset: invalid choice: 'imagenet'"),
    (["posterior", "model", "--k", "1"], r"argument --k: must be an integer >= 2, got 1"),
    (["posterior", "model", "--continuation-steps", "0"], r"argument --continuation-steps: must be an integer >= 1"),
    (["posterior", "model", "--method", "swag"], r"argument --method: invalid choice: 'swag'"),
]


@pytest.mark.parametrize("argv, pattern", [pytest.param(a, p, id=" ".join(a)) for a, p in CLI_ROWS])
def test_cli_flag_is_a_usage_error(argv, pattern, capsys, tmp_path, monkeypatch):
    from vdu.__main__ import main
    monkeypatch.chdir(tmp_path)                       # nothing may be written, but if it were: not in the repo
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err
    import re
    assert re.search(pattern, err), err
    assert list(tmp_path.iterdir()) == []


# ---- resuming pretraining ---------------------------------------------------------------------------

def _cfg(out, **kw):
    return tiny_train_config(out, **kw)


@pytest.fixture(scope="module")
def half_run(tmp_path_factory, small_data):
    """A run stopped at step 4 of 6 (checkpoints at 2 and 4)."""
    out = tmp_path_factory.mktemp("half") / "run"
    pretrain(_cfg(out), data=small_data, until=4, progress=False)
    return out


@pytest.mark.parametrize("field, new", [("lr", 2e-3), ("warmup", 3), ("lr_final_frac", 0.5), ("weight_decay", 0.01),
                                        ("grad_clip", 0.5), ("ema_decay", 0.99), ("ema_warmup", False),
                                        ("max_train", 128)])
def test_resume_refuses_a_changed_hyperparameter(half_run, small_data, field, new):
    before = {p.name: p.stat().st_mtime_ns for p in half_run.iterdir()}
    old = getattr(_cfg(half_run), field)
    flag = "--" + field.replace("_", "-")
    hint = (flag if old else f"--no-{field.replace('_', '-')}") if isinstance(old, bool) else \
        f"{flag} {old}" if old is not None else f"leave out {flag}"
    with pytest.raises(ValueError, match=rf"{field}: recorded {old!r}, now {new!r}.*Resume with the recorded value "
                                         rf"\({field}={old!r}; on the command line: {hint}\).*another --out"):
        pretrain(_cfg(half_run, **{field: new}), data=small_data, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in half_run.iterdir()} == before   # nothing touched


def test_resume_compares_a_field_the_recording_run_did_not_have_with_its_default(half_run, small_data, tmp_path):
    """A run recorded before ``ema_warmup`` existed ran with the EMA warm-up: resuming it without is refused."""
    run = tmp_path / "old"
    shutil.copytree(half_run, run)
    st = torch.load(run / "state.pt", weights_only=False)
    del st["config"]["ema_warmup"]
    torch.save(st, run / "state.pt")
    with pytest.raises(ValueError, match=r"ema_warmup: recorded True, now False.*command line: --ema-warmup\)"):
        pretrain(_cfg(run, ema_warmup=False), data=small_data, progress=False)
    assert pretrain(_cfg(run), data=small_data, progress=False).exists()


def test_resume_refuses_another_architecture(half_run, small_data):
    other = {**TINY, "block_out_channels": (8, 32)}
    with pytest.raises(ValueError, match=r"model_overrides: recorded .*Resume with the recorded value"):
        pretrain(_cfg(half_run, model_overrides=other), data=small_data, progress=False)


def _weights(model_dir):
    return load_file(Path(model_dir) / "unet" / "diffusion_pytorch_model.safetensors")


def test_corrupt_state_falls_back_to_the_previous_checkpoint(half_run, small_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(half_run, run)
    assert torch.load(run / "state.prev.pt", weights_only=False)["step"] == 2
    assert torch.load(run / "state.pt", weights_only=False)["step"] == 4
    good = (run / "state.pt").read_bytes()
    (run / "state.pt").write_bytes(good[: len(good) // 3])                     # truncated mid-write
    with pytest.warns(RuntimeWarning, match=r"state.pt cannot be loaded .*resuming from .*state.prev.pt \(step 2\)"):
        model = pretrain(_cfg(run), data=small_data, progress=False)
    assert torch.load(run / "state.pt", weights_only=False)["step"] == 6
    assert (run / "state.corrupt.pt").exists()
    assert torch.load(run / "state.prev.pt", weights_only=False)["step"] == 4    # rotated, never the corrupt file
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert {"step": 2, "resumed_from": "state.prev.pt", "reason": "state.pt unreadable or missing"} in log
    full = pretrain(_cfg(tmp_path / "full"), data=small_data, progress=False)   # uninterrupted: the same weights
    a, b = _weights(full), _weights(model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_state_after_a_kill_between_renames_resumes_from_prev(half_run, small_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(half_run, run)
    (run / "state.pt").unlink()
    with pytest.warns(RuntimeWarning, match=r"state.pt is missing .*resuming from .*state.prev.pt \(step 2\)"):
        pretrain(_cfg(run), data=small_data, until=4, progress=False)
    assert torch.load(run / "state.pt", weights_only=False)["step"] == 4


def test_both_checkpoints_corrupt_is_a_clear_error(half_run, small_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(half_run, run)
    (run / "state.pt").write_bytes(b"garbage")
    (run / "state.prev.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"both checkpoints are unreadable .*state.pt \(.*\) and .*state.prev.pt "
                                         r"\(.*\)\. Delete both to restart this run from step 0, or start a new run"):
        pretrain(_cfg(run), data=small_data, progress=False)


# ---- kill -9 ----------------------------------------------------------------------------------------

def _spawn(code: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    prelude = "import os, sys, time, torch\ntorch.set_num_threads(1)\n"
    return subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _kill_when(proc: subprocess.Popen, word: str, delay: float = 0.0, timeout: float = 120.0) -> None:
    """SIGKILL ``proc`` ``delay`` seconds after it prints ``word``."""
    buf, fd, end = b"", proc.stdout.fileno(), time.time() + timeout
    while word.encode() not in buf:
        if time.time() > end:
            proc.kill()
            raise AssertionError(f"the child never printed {word!r} in {timeout} s:\n{buf.decode(errors='replace')}")
        if select.select([fd], [], [], 0.2)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:                                  # EOF: the child exited before the point of the test
                proc.wait()
                raise AssertionError(f"the child exited ({proc.returncode}) before printing {word!r}:\n"
                                     f"{buf.decode(errors='replace')}")
            buf += chunk
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, buf.decode(errors="replace")


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_kill_9_during_unlearn_leaves_no_half_written_model(tmp_path):
    target = tmp_path / "unlearned"
    proc = _spawn(f"""
        from conftest import tiny_unet
        from vdu.unlearning import unlearn
        torch.set_num_threads(1)                     # conftest sets 2
        x = torch.rand(16, 1, 28, 28) * 2 - 1
        def started(step, model, log):
            if step == 1:
                print("running", flush=True)
        unlearn(tiny_unet(), x, "neggrad", steps=100_000, batch_size=4, probe_every=0, progress=False,
                save_to={str(target)!r}, callback=started)
    """)
    _kill_when(proc, "running", delay=1.5)
    assert not target.exists() or (holds_model(target) and load_model(target))   # absent, or complete


SLOW_WRITER = """
    import safetensors.torch
    def slow(tensors, filename, metadata=None):      # writes part of the weights, then hangs until killed
        with open(filename, "wb") as f:
            f.write(b"half a safetensors file")
            f.flush()
        print("writing", flush=True)
        time.sleep(600)
    safetensors.torch.save_file = slow
"""
SLOW_EXCHANGE = """
    import vdu.models
    real_exchange = vdu.models._exchange
    def slow_exchange(a, b):                         # the atomic swap is about to happen
        print("writing", flush=True)
        time.sleep(600)
        return real_exchange(a, b)
    vdu.models._exchange = slow_exchange
"""
SLOW_SWAP = """
    import vdu.models
    vdu.models._exchange = lambda a, b: False        # a system without renameat2: two renames
    real = os.replace
    def slow(src, dst):                              # the new folder is about to be renamed into place
        if str(dst) == {target!r}:
            print("writing", flush=True)
            time.sleep(600)
        return real(src, dst)
    os.replace = slow
"""


@pytest.mark.parametrize("case", ["new", "overwrite", "exchange", "swap"])
def test_kill_9_during_save_model_never_leaves_a_half_written_folder(tmp_path, case):
    """new: killed while writing the weights of a first save -> no folder. overwrite: killed while writing
    the replacement -> the old model, byte-identical. exchange: killed just before the atomic swap -> the
    old model, byte-identical. swap (systems without renameat2): killed between the two renames of an
    overwrite -> no folder at the target, both models complete beside it, and load_model says where the
    old one is."""
    target = tmp_path / "m"
    before = None
    if case != "new":
        save_model(tiny_unet(seed=0), SCHED, target, card={"a": 1})
        before = _tree(target)
    patch = {"swap": SLOW_SWAP.format(target=str(target)), "exchange": SLOW_EXCHANGE}.get(case, SLOW_WRITER)
    proc = _spawn(textwrap.dedent(patch) + textwrap.dedent(f"""
        from conftest import tiny_unet
        from vdu.models import build_scheduler, save_model
        torch.set_num_threads(1)
        save_model(tiny_unet(seed=1), build_scheduler(), {str(target)!r}, overwrite=True)
        print("saved", flush=True)
    """))
    _kill_when(proc, "writing")
    if case == "new":
        assert not target.exists()
    elif case in ("overwrite", "exchange"):
        assert _tree(target) == before                                  # untouched, loadable
        load_model(target)
    else:
        assert not target.exists()
        with pytest.raises(FileNotFoundError, match="interrupted overwrite left the previous model"):
            load_model(target)
        old = [p for p in tmp_path.iterdir() if p.name.startswith("m.old-")]
        new = [p for p in tmp_path.iterdir() if p.name.startswith(".m.tmp-")]
        assert len(old) == 1 and _tree(old[0]) == before                 # the old model, complete, beside it
        assert len(new) == 1 and load_model(new[0])                      # and the new one, complete
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "m"]
    assert all(n.startswith((".m.tmp-", "m.old-")) for n in leftovers), leftovers


@pytest.mark.slow
def test_kill_9_during_a_papermill_run_leaves_no_half_written_model(tmp_path):
    """The pretrain notebook (smoke profile, a longer demonstration run) killed with SIGKILL, kernel and all,
    while it trains and exports: its run folder holds either no model or a complete, loadable one, and its
    checkpoint resumes; the results file of an earlier run is still whole JSON."""
    demo = REPO / "runs" / "notebooks" / "mnist-demo"
    shutil.rmtree(demo, ignore_errors=True)                 # no state.pt of an earlier run
    out = tmp_path / "out.ipynb"
    proc = subprocess.Popen([sys.executable, "-m", "papermill", "pretrain.ipynb", str(out), "-p", "demo_steps", "400",
                             "-p", "demo_images", "256"], cwd=REPO / "notebooks", start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    end = time.time() + 240
    while not (demo / "state.pt").exists():                  # the demonstration run has started
        assert proc.poll() is None, "papermill exited before the demonstration run started"
        assert time.time() < end, "the demonstration run did not start within 240 s"
        time.sleep(0.5)
    time.sleep(3)
    os.killpg(proc.pid, signal.SIGKILL)                     # papermill and its kernel
    proc.wait()
    assert not (demo / "model").exists() or (holds_model(demo / "model") and load_model(demo / "model"))
    assert torch.load(demo / "state.pt", weights_only=False)["step"] > 0
    for f in (REPO / "results" / "mnist" / "smoke").glob("*.json"):
        json.loads(f.read_text())
