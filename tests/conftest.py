import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Real MNIST (the four *-ubyte.gz files): NOISE_DATA_DIR, else the shared copy beside the checkout.
MNIST_DIR = Path(os.environ.get("NOISE_DATA_DIR", ROOT.parent / "shared" / "data" / "mnist"))


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"real MNIST not found in {MNIST_DIR}; set NOISE_DATA_DIR to the folder of the four files")
    return MNIST_DIR


@pytest.fixture
def fail_runs(monkeypatch):
    """install(predicate, message): make nnet_models.train_and_evaluate raise for the configs that
    `predicate` picks (forked pool workers inherit the patch); returns a function undoing it."""
    import nnet_models as nm

    real = nm.train_and_evaluate

    def install(predicate, message="injected failure"):
        def sometimes_fails(cfg, data=None):
            if predicate(cfg):
                raise RuntimeError(message)
            return real(cfg, data)

        monkeypatch.setattr(nm, "train_and_evaluate", sometimes_fails)
        return lambda: monkeypatch.setattr(nm, "train_and_evaluate", real)

    return install
