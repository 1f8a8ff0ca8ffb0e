"""Shared fixtures: a small model trained on the synthetic set, and the offline data bundle's
location."""
from pathlib import Path

import pytest
import torch

from d2r_lib import data, methods, models

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
    if not (SHARED_DATA / "cifar10_test_1000.npz").exists():
        pytest.skip(f"offline data bundle not found at {SHARED_DATA} "
                    "(expected ../shared/data beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synthetic_xy():
    x, y = data.synthetic(512, num_classes=10, image_size=32, seed=0).tensors()
    return x, y


@pytest.fixture(scope="session")
def trained_cnn(synthetic_xy):
    """small_cnn trained with plain CE on the synthetic set (clean accuracy near 100 %), in eval
    mode."""
    torch.manual_seed(0)
    x, y = synthetic_xy
    model = models.build_model("small_cnn")
    opt = methods.make_optimizer(model, lr=0.05)
    for _ in range(6):
        for i in range(0, len(x), 64):
            methods.train_step("standard", model, None, opt, x[i:i + 64], y[i:i + 64])
    model.eval()
    return model
