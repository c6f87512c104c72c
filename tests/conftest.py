import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("TQDM_DISABLE", "1")
# Trained baselines are never cached in the user's cache folder: session fixtures use this folder, each test
# its own (_own_baseline_cache below).
_OWN_CACHE = None
if "TORCHSLIM_CACHE_DIR" not in os.environ:
    _OWN_CACHE = os.environ["TORCHSLIM_CACHE_DIR"] = tempfile.mkdtemp(prefix="torchslim-cache-")


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    from torchslim.data import default_data_dir

    d = Path(os.environ.get("TORCHSLIM_DATA_DIR", default_data_dir()))
    if not (d / "mnist").is_dir():
        pytest.skip(f"shared datasets not found at {d}")
    return d


@pytest.fixture(scope="session")
def digits_data():
    from torchslim.data import digits

    return digits(seed=0)


@pytest.fixture(scope="session")
def trained_lenet5(digits_data):
    """A LeNet-5 trained briefly on digits (shared by tests; copy before modifying)."""
    from torchslim import TrainConfig, train
    from torchslim.models import LeNet5

    torch.manual_seed(0)
    model = LeNet5()
    train(model, digits_data.train, TrainConfig(epochs=4, lr=2e-3, progress=False))
    return model.eval()


@pytest.fixture(autouse=True)
def _own_baseline_cache(tmp_path_factory, monkeypatch):
    """Each test its own baseline cache (its subprocesses included): no test reuses another's trained model."""
    monkeypatch.setenv("TORCHSLIM_CACHE_DIR", str(tmp_path_factory.mktemp("baseline-cache")))
