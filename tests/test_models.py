import json

import pytest
import torch

from conftest import tiny_unet
from vdu.models import build_scheduler, build_unet, check_images, load_model, null_class, save_model


def test_presets_and_null_class():
    u = build_unet("mnist")
    assert u.config.sample_size == 28 and u.config.in_channels == 1 and null_class(u) is None
    c = build_unet("cifar10", conditional=True)
    assert c.config.in_channels == 3 and null_class(c) == 10
    with pytest.raises(ValueError, match="unknown dataset"):
        build_unet("svhn")


def test_save_load_round_trip(tmp_path):
    u, s = tiny_unet(conditional=True), build_scheduler()
    save_model(u, s, tmp_path / "m", dtype=torch.float32, card={"a": 1})
    u2, s2 = load_model(tmp_path / "m")
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([3, 500])
    lab = torch.tensor([1, 10])
    assert torch.allclose(u(x, t, class_labels=lab).sample, u2(x, t, class_labels=lab).sample, atol=1e-6)
    assert s2.config.num_train_timesteps == 1000 and json.loads((tmp_path / "m" / "card.json").read_text()) == {"a": 1}
    save_model(u, s, tmp_path / "m", overwrite=True)  # replaces the whole folder; float16 storage by default
    assert not (tmp_path / "m" / "card.json").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    u3, _ = load_model(tmp_path / "m")
    assert next(u3.parameters()).dtype == torch.float32
    assert torch.allclose(u(x, t, class_labels=lab).sample, u3(x, t, class_labels=lab).sample, atol=1e-2)


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="download"):
        load_model("google/ddpm-not-a-real-model-xyz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no diffusers UNet"):
        load_model(tmp_path / "empty")
    save_model(tiny_unet(), build_scheduler(), tmp_path / "m")
    w = tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    with pytest.raises(ValueError, match="corrupt"):
        load_model(tmp_path / "m")


def test_image_shape_checks():
    u = tiny_unet()
    check_images(u, torch.zeros(2, 1, 28, 28))
    for bad in (torch.zeros(2, 3, 28, 28), torch.zeros(2, 1, 32, 32), torch.zeros(1, 28, 28)):
        with pytest.raises(ValueError, match="expects|expected"):
            check_images(u, bad)
