"""Writes tests/data/v1_lenet300.slim (checkpoint format_version 1, the JSON manifest) and the input and outputs it
must reproduce. Kept for reference: run with the torchslim that wrote format 1 (later versions write newer files)."""

from pathlib import Path

import safetensors.torch
import torch

import torchslim
from torchslim.models import LeNet300

HERE = Path(__file__).parent

torch.manual_seed(0)
model = LeNet300(num_classes=3, in_features=8)
model = torchslim.prune(model, torchslim.UnstructuredPruning(sparsity=0.9))
model = torchslim.quantize(model, torchslim.WeightSharing(bits=3, exclude=("fc3",)))
model.eval()
x = torch.randn(4, 8)
with torch.no_grad():
    y = model(x)
torchslim.save(model, HERE / "v1_lenet300.slim", overwrite=True)
safetensors.torch.save_file({"x": x, "y": y}, HERE / "v1_lenet300.expected.safetensors")
