"""The command line's unlearn and evaluate: flags generated from the loop's and each method's config (with
their comments as help), a run on a tiny model folder that saves and reloads, and the same refusals as the API."""
import json

import pytest
import torch

from conftest import tiny_unet
from vdu.__main__ import main
from vdu.methods import REGISTRY
from vdu.models import build_scheduler, load_model, save_model


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_every_method_has_its_options_on_the_command_line(method, capsys):
    with pytest.raises(SystemExit) as e:
        main(["unlearn", "--method", method, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for f in REGISTRY[method].Config.__dataclass_fields__:
        assert f"--{f.replace('_', '-')}" in text
    assert "--stop-forget-ratio" in text and "--- " not in text


@pytest.fixture
def tiny_folder(tmp_path):
    return save_model(tiny_unet(), build_scheduler(), tmp_path / "tiny")


def test_unlearn_saves_a_model_that_loads_and_refuses_to_overwrite_it(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["unlearn", str(tiny_folder), "--method", "neggrad", "--forget-class", "1", "--n-forget", "8",
            "--steps", "2", "--batch-size", "4", "--probe-every", "1", "--probe-size", "4", "--no-progress",
            "--dataset", "mnist", "--out", str(out)]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps_done"] == 2 and summary["method"] == "neggrad"
    load_model(out)
    assert (out / "unlearn.json").exists()
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err


def test_unlearn_refuses_what_the_api_refuses(tiny_folder, tmp_path, capsys):
    base = ["unlearn", str(tiny_folder), "--forget-class", "1", "--n-forget", "8", "--steps", "1", "--no-progress",
            "--dataset", "mnist", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit):                       # an option of another method
        main(base + ["--method", "neggrad", "--gamma", "0.5"])
    assert "unrecognized arguments: --gamma" in capsys.readouterr().err
    with pytest.raises(SystemExit):                       # a method that needs a conditional model
        main(base + ["--method", "esd"])
    assert "class-conditional" in capsys.readouterr().err
    with pytest.raises(SystemExit):                       # a value the config refuses
        main(base + ["--method", "vdu", "--stability", "function", "--gamma", "2"])
    assert "gamma must be in [0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--method", "vdu", "--lr", "fast"])
    assert "must be a number" in capsys.readouterr().err


def test_evaluate_prints_the_metrics(tiny_folder, capsys):
    assert main(["evaluate", str(tiny_folder), "--forget-class", "1", "--n-samples", "4", "--steps", "1",
                 "--bootstrap", "10", "--fid-bootstrap", "0", "--nll-timesteps", "0", "--nll-images", "0",
                 "--n-reference", "8", "--dataset", "mnist"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_samples"] == 4 and "forget_share" in out and "u_fid" in out


def test_evaluate_scores_with_a_second_evaluator(tiny_folder, capsys, tmp_path):
    from vdu.evaluator import Evaluator, save_evaluator
    save_evaluator(Evaluator(1, 10, 28, width=4, arch="lenet"), tmp_path / "second")
    assert main(["evaluate", str(tiny_folder), "--forget-class", "1", "--n-samples", "4", "--steps", "1",
                 "--bootstrap", "10", "--fid-bootstrap", "0", "--nll-images", "0", "--n-reference", "8",
                 "--dataset", "mnist", "--second-evaluator", str(tmp_path / "second")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0 <= out["label_agreement"] <= 1 and len(out["counts_second"]) == 10 and "labels_second" not in out


def test_card_records_the_sampler_it_measured_with(tiny_folder, capsys, monkeypatch):
    from conftest import CKPT
    from vdu import evaluation
    ev = str(CKPT / "evaluator")
    used = []
    real = evaluation.sample
    monkeypatch.setattr(evaluation, "sample",
                        lambda *a, **k: used.append((k["method"], k["steps"], k["seed"])) or real(*a, **k))
    main(["card", str(tiny_folder), "--evaluator", ev, "--n", "4", "--steps", "2", "--sampler", "ddpm",
          "--nll-images", "2", "--seed-bank", "1"])
    assert used == [("ddpm", 2, 1)]         # drawn with the sampler and from the seed bank the card names
    card = json.loads((tiny_folder / "card.json").read_text())
    assert card["metrics"]["samples"]["sampler"] == "DDPM ancestral, 2 steps"
    assert card["metrics"]["samples"]["seed_bank"] == 1
    assert (tiny_folder / "samples.png").exists() and "--sampler ddpm" in card["card_command"]
    with pytest.raises(SystemExit) as e:
        main(["card", str(tiny_folder), "--evaluator", ev, "--sampler", "euler"])
    assert e.value.code == 2


def test_pretrain_takes_the_unet_architecture_as_json(tmp_path, monkeypatch):
    """--model-overrides reaches the training config (and so the UNet that is built) as the dict it spells."""
    import vdu.training
    from conftest import TINY
    seen = {}
    monkeypatch.setattr(vdu.training, "pretrain", lambda cfg, **kw: seen.setdefault("cfg", cfg) and tmp_path)
    overrides = json.loads(json.dumps(TINY))          # lists, as JSON spells them
    assert main(["pretrain", "--out", str(tmp_path / "run"), "--model-overrides", json.dumps(overrides)]) == 0
    assert seen["cfg"].model_overrides == overrides
    unet = vdu.training.build_unet("mnist", **seen["cfg"].model_overrides)
    assert tuple(unet.config.block_out_channels) == (8, 16)


def test_a_cards_pretrain_command_reproduces_the_config(tmp_path, monkeypatch):
    """TrainConfig.command() (the card's `command`) parsed by the CLI gives back the same config, model
    overrides (the architecture) included."""
    import shlex
    import vdu.training
    from vdu.training import TrainConfig
    cfg = TrainConfig(dataset="cifar10", steps=14000, lr=5e-4, seed=3, ema_warmup=False, out=str(tmp_path / "run dir"),
                      model_overrides={"block_out_channels": [32, 64, 128], "layers_per_block": 1,
                                       "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"]})
    got = []
    monkeypatch.setattr(vdu.training, "pretrain", lambda c, **kw: got.append(c))
    argv = shlex.split(cfg.command())
    assert argv[:3] == ["python", "-m", "vdu"]
    main(argv[3:])
    assert got == [cfg]


def test_average_writes_the_mean_of_the_weights_and_refuses_what_it_cannot_average(tmp_path, capsys):
    from conftest import TINY
    from vdu.models import build_unet
    a = save_model(tiny_unet(seed=0), build_scheduler(), tmp_path / "a", dtype=None)
    b = save_model(tiny_unet(seed=1), build_scheduler(), tmp_path / "b", dtype=None)
    out = tmp_path / "soup"
    assert main(["average", str(out), str(a), str(b)]) == 0
    ua, ub, us = (load_model(f)[0].state_dict() for f in (a, b, out))
    for k in us:                                          # stored as float16, like every model folder
        assert torch.allclose(us[k], ((ua[k] + ub[k]) / 2).half().float())
    assert json.loads((out / "averaged.json").read_text())["from"] == [str(a), str(b)]
    with pytest.raises(SystemExit) as e:                  # never overwrites a model without being told
        main(["average", str(out), str(a), str(b)])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    wide = save_model(build_unet("mnist", **{**TINY, "block_out_channels": [2 * c for c in TINY["block_out_channels"]]}),
                      build_scheduler(), tmp_path / "wide")
    with pytest.raises(ValueError, match="not the architecture"):
        main(["average", str(tmp_path / "x"), str(a), str(wide)])
    with pytest.raises(ValueError, match="named twice"):
        main(["average", str(tmp_path / "y"), str(a), str(a)])
    from diffusers import DDPMScheduler
    other = save_model(tiny_unet(seed=2), DDPMScheduler(num_train_timesteps=500), tmp_path / "other-schedule")
    with pytest.raises(ValueError, match="noise schedule"):
        main(["average", str(tmp_path / "z"), str(a), str(other)])
    with pytest.raises(SystemExit) as e:
        main(["average", str(tmp_path / "y"), str(a)])
    assert e.value.code == 2 and "two or more" in capsys.readouterr().err
    from conftest import CKPT                              # its card says how it was made
    main(["card", str(out), "--evaluator", str(CKPT / "evaluator"), "--n", "4", "--steps", "2", "--nll-images", "2"])
    assert json.loads((out / "card.json").read_text())["command"] == f"python -m vdu average {out} {a} {b}"
