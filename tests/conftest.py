import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
REPO = Path(__file__).resolve().parents[1]
CKPT = REPO / "checkpoints" / "mnist"
TINY = dict(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))


@pytest.fixture(scope="session")
def mnist_test():
    from vdu.data import load_dataset
    return load_dataset("mnist", "test")


@pytest.fixture(scope="session")
def evaluator():
    from vdu.evaluator import load_evaluator
    return load_evaluator(CKPT / "evaluator")


def tiny_unet(conditional=False, seed=0):
    from vdu.models import build_unet
    torch.manual_seed(seed)
    return build_unet("mnist", conditional, **TINY)


@pytest.fixture(scope="session")
def small_data():
    """256 MNIST test digits: enough for a few tiny pretraining steps."""
    from vdu.data import load_dataset
    return load_dataset("mnist", "test").take(256, seed=0)


def tiny_train_config(out, **kw):
    """A TrainConfig for a run of a few steps of the tiny UNet (snapshots every step, checkpoints every 2)."""
    from vdu.training import TrainConfig
    base = dict(steps=6, batch_size=16, lr=1e-3, warmup=2, checkpoint_every=2, log_every=2, k_snapshots=3,
                snapshot_every=1, out=str(out), model_overrides=TINY)
    return TrainConfig(**{**base, **kw})
