"""Data sets: scikit-learn's bundled digits (the embedded default) and MNIST from idx files."""

from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from ..core.errors import DataError
from .batches import as_example_inputs, batch_size, call_model, select, split_batch, to_device

__all__ = ["Splits", "digits", "mnist", "default_data_dir", "load_dataset", "check_loader", "first_batch",
           "split_batch", "call_model", "to_device", "batch_size", "as_example_inputs"]


@dataclasses.dataclass
class Splits:
    """Train / validation / test loaders of one data set. ``val`` is held out from ``train`` and is
    what searches and guard rails measure on; ``test`` is only for the final report."""

    name: str
    train: DataLoader
    val: DataLoader
    test: DataLoader
    num_classes: int

    def example_inputs(self, n: int = 1) -> tuple | dict:
        """The first ``n`` samples' inputs of the test split: a tuple of positional inputs or a dict of
        keyword inputs."""
        inputs, _ = split_batch(next(iter(self.test)))
        return as_example_inputs(select(inputs, slice(0, n)))


def default_data_dir() -> Path:
    """``../shared/datasets`` beside the working directory, else beside the source checkout."""
    candidates = [Path.cwd() / ".." / "shared" / "datasets",
                  Path(__file__).resolve().parents[3] / ".." / "shared" / "datasets"]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    return candidates[0]


def _loaders(name: str, x_tr, y_tr, x_te, y_te, batch_size: int, val_fraction: float, seed: int,
             num_classes: int) -> Splits:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x_tr), generator=g)
    n_val = int(round(len(x_tr) * val_fraction))
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    train = DataLoader(TensorDataset(x_tr[tr_idx], y_tr[tr_idx]), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    val = DataLoader(TensorDataset(x_tr[val_idx], y_tr[val_idx]), batch_size=512)
    test = DataLoader(TensorDataset(x_te, y_te), batch_size=512)
    return Splits(name, train, val, test, num_classes)


def digits(batch_size: int = 64, image_size: int = 28, val_fraction: float = 0.15, seed: int = 0) -> Splits:
    """scikit-learn's bundled 8x8 digits (1,797 images), upsampled to ``image_size`` and normalised.

    A fixed, seeded 80/20 split gives train (minus ``val_fraction`` for validation) and test.
    """
    from sklearn.datasets import load_digits

    ds = load_digits()
    x = torch.tensor(ds.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    y = torch.tensor(ds.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    n_test = len(x) // 5
    te, tr = perm[:n_test], perm[n_test:]
    return _loaders("digits", x[tr], y[tr], x[te], y[te], batch_size, val_fraction, seed, 10)


def _read_idx(path: Path, offset: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            return np.frombuffer(f.read(), np.uint8, offset=offset)
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read MNIST file {path}: {exc}") from None


def mnist(data_dir: str | Path | None = None, batch_size: int = 128, val_fraction: float = 1 / 12,
          seed: int = 0, subset: int | None = None) -> Splits:
    """MNIST from the original idx files in ``DATA_DIR/mnist`` (60k train, 10k test), normalised
    with the usual mean 0.1307 / std 0.3081. ``subset`` keeps the first N train and N//6 test images."""
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    folder = root / "mnist"
    names = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(f"MNIST not found: {folder} lacks {missing}. Pass data_dir= (or --data-dir) pointing at "
                        "the folder that contains mnist/ with the four idx .gz files.")
    xs = [_read_idx(folder / n, 16).reshape(-1, 1, 28, 28) for n in names[0::2]]
    ys = [_read_idx(folder / n, 8) for n in names[1::2]]

    def prep(a: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(a.astype(np.float32) / 255.0) - 0.1307) / 0.3081

    x_tr, x_te = prep(xs[0]), prep(xs[1])
    y_tr, y_te = torch.from_numpy(ys[0].astype(np.int64)), torch.from_numpy(ys[1].astype(np.int64))
    if subset is not None:
        x_tr, y_tr = x_tr[:subset], y_tr[:subset]
        x_te, y_te = x_te[: max(1, subset // 6)], y_te[: max(1, subset // 6)]
    return _loaders("mnist", x_tr, y_tr, x_te, y_te, batch_size, val_fraction, seed, 10)


def load_dataset(name: str, **kwargs) -> Splits:
    """Built-in data set by name: ``digits`` or ``mnist``."""
    if name == "digits":
        return digits(**kwargs)
    if name == "mnist":
        return mnist(**kwargs)
    raise DataError(f"unknown data set {name!r}; built-in data sets: ['digits', 'mnist']")


def first_batch(loader, what: str = "data loader"):
    """The first batch of ``loader``; DataError if it is None, not iterable or yields no batch."""
    if loader is None:
        raise DataError(f"{what} is required but None was given")
    try:
        batches = iter(loader)
    except TypeError:  # only iter() itself: a TypeError inside the user's dataset must surface as it is
        raise DataError(f"{what} must be an iterable of batches (a DataLoader or a list of batches), got "
                        f"{type(loader).__name__}") from None
    try:
        return next(batches)
    except StopIteration:
        raise DataError(f"{what} is empty: it yielded no batch. Pass a loader with at least one batch.") from None


def check_loader(loader, what: str = "data loader") -> None:
    """Raise DataError if ``loader`` is None, not iterable or yields no batch."""
    first_batch(loader, what)
