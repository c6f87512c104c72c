"""A model and a data factory of your own, for recipes/custom_model.yaml (factories live next to the recipe)."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def build(hidden: int = 128, num_classes: int = 10) -> nn.Module:
    """An MLP on 8x8 digit images (a plain nn.Sequential: no torchslim base class needed)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


def loaders(batch_size: int = 64, seed: int = 0) -> dict:
    """Train / val / test loaders: val is held out from train (the search and the guard measure on it),
    test is only for the final report."""
    from sklearn.datasets import load_digits

    ds = load_digits()
    x = torch.tensor(ds.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(ds.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test, val, train = perm[:360], perm[360:720], perm[720:]
    return {
        "train": DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed)),
        "val": DataLoader(TensorDataset(x[val], y[val]), batch_size=512),
        "test": DataLoader(TensorDataset(x[test], y[test]), batch_size=512),
        "num_classes": 10,
    }
