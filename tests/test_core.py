"""Configs, models, data, metrics and the trainer."""

import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchslim
from torchslim import ConfigError, DataError, TorchslimError
from torchslim.core.config import config_from_dict
from torchslim.data import digits, mnist
from torchslim.export import profile
from torchslim.metrics import count_macs, count_params, count_tables, evaluate, measure_latency
from torchslim.models import LeNet5, LeNet300, SmallMobileNet, build_model


def test_config_round_trip_and_validation():
    cfg = torchslim.StructuredPruning(ratio=0.3, importance="taylor", exclude=("fc*",),
                                      schedule=torchslim.Schedule("iterative", 2, torchslim.TrainConfig(epochs=2)))
    back = config_from_dict(cfg.to_dict())
    assert back == cfg
    assert back.schedule.finetune.epochs == 2
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ConfigError, match="sparsity"):
            torchslim.UnstructuredPruning(sparsity=bad)
    with pytest.raises(ConfigError, match="importance"):
        torchslim.StructuredPruning(importance="random")
    with pytest.raises(ConfigError, match="finetune"):
        torchslim.Schedule("iterative", 3)
    with pytest.raises(ConfigError, match="unknown key"):
        config_from_dict({"type": "UnstructuredPruning", "sparsty": 0.5})
    with pytest.raises(ConfigError, match="unknown config type"):
        config_from_dict({"type": "Nope"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.ratio = 0.1


def test_models_shapes_and_sizes():
    x = torch.randn(2, 1, 28, 28)
    assert count_params(LeNet5())[0] == 431_080  # the Caffe LeNet-5 of Deep Compression (1.72 MB in fp32)
    assert count_params(LeNet300())[0] == 266_610
    for name in ("lenet300", "lenet5", "resnet_small", "mobilenet_small"):
        assert build_model(name)(x).shape == (2, 10)
    assert LeNet5(width=0.25).conv1.out_channels == 5
    assert any(m.groups > 1 for m in SmallMobileNet().modules() if isinstance(m, nn.Conv2d))
    with pytest.raises(ConfigError, match="unknown model"):
        build_model("vgg")


def test_digits_split_is_disjoint_and_seeded():
    a, b = digits(seed=0), digits(seed=0)
    xa, _ = next(iter(a.test))
    xb, _ = next(iter(b.test))
    assert torch.equal(xa, xb)
    assert xa.shape[1:] == (1, 28, 28)
    n_train, n_val, n_test = (len(s.dataset) for s in (a.train, a.val, a.test))
    assert n_train + n_val + n_test == 1797 and n_val > 0 and n_test == 359
    assert digits(image_size=8).example_inputs()[0].shape[-1] == 8


def test_mnist_reads_idx_files(data_dir):
    s = mnist(data_dir, subset=600)
    x, y = next(iter(s.train))
    assert x.shape[1:] == (1, 28, 28) and y.dtype == torch.long
    assert len(s.test.dataset) == 100
    assert abs(float(x.mean())) < 0.5  # normalised


def test_mnist_missing_path_names_it(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)):
        mnist(tmp_path)


def test_count_params_and_macs():
    lin = nn.Sequential(nn.Linear(10, 4))
    assert count_params(lin) == (44, 44) or count_params(lin)[0] == 44
    assert count_macs(lin, (torch.randn(3, 10),)) == 3 * 10 * 4
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
    assert count_macs(conv, (torch.randn(1, 2, 5, 5),)) == 5 * 5 * 3 * 2 * 9
    with torch.no_grad():
        lin[0].weight[:2] = 0
    assert count_params(lin)[1] == 44 - 20 - int((lin[0].bias == 0).sum())


def test_profile_and_latency():
    m = LeNet300()
    p = profile(m, (torch.randn(8, 1, 28, 28),), repeats=5)
    assert p.params == 266_610 and p.nonzero_params <= p.params
    assert p.macs == 8 * (784 * 300 + 300 * 100 + 100 * 10)
    assert p.latency_ms > 0
    assert p.size_bytes > 266_610 * 4  # fp32 weights plus manifest
    assert measure_latency(m, (torch.randn(1, 1, 28, 28),), warmup=1, repeats=3) > 0


def test_train_learns_and_evaluate(digits_data):
    torch.manual_seed(0)
    m = LeNet300()
    before = evaluate(m, digits_data.test)
    hist = torchslim.train(m, digits_data.train, torchslim.TrainConfig(epochs=2, lr=2e-3, progress=False),
                           val_loader=digits_data.val)
    after = evaluate(m, digits_data.test)
    assert after > 0.85 > before
    assert len(hist.val_accuracy) == 2 and hist.loss[-1] < hist.loss[0]


def test_train_rejects_empty_loader_and_reports_divergence():
    empty = DataLoader(TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)), batch_size=2)
    with pytest.raises(DataError, match="empty"):
        torchslim.train(nn.Linear(4, 2), empty)
    with pytest.raises(DataError, match="empty"):
        evaluate(nn.Linear(4, 2), empty)
    nan_data = DataLoader(TensorDataset(torch.full((4, 4), math.nan), torch.zeros(4, dtype=torch.long)), batch_size=2)
    with pytest.raises(TorchslimError, match="diverged"):
        torchslim.train(nn.Linear(4, 2), nan_data, torchslim.TrainConfig(progress=False))


def test_threads_share_the_cores_and_overrides_win(monkeypatch):
    import os

    from torchslim.cli import build_parser
    from torchslim.core import threads

    monkeypatch.delenv(threads.ENV, raising=False)
    cores = threads.available_cores()
    assert threads.threads_per_worker() == cores
    assert threads.threads_per_worker(workers=cores * 4) == 1  # at least one
    assert threads.threads_per_worker(2) == max(1, cores // 2)
    assert threads.threads_per_worker(2, threads=3) == 3
    monkeypatch.setenv(threads.ENV, "5")
    assert threads.threads_per_worker(8) == 5
    monkeypatch.setenv(threads.ENV, "many")
    with pytest.raises(ConfigError, match="TORCHSLIM_THREADS='many'"):
        threads.threads_per_worker()
    monkeypatch.delenv(threads.ENV)
    before = torch.get_num_threads()
    with threads.threads_override(1):
        assert torch.get_num_threads() == 1 and os.environ[threads.ENV] == "1"  # inherited by worker processes
    assert torch.get_num_threads() == before and threads.ENV not in os.environ
    with pytest.raises(ConfigError, match="--threads=0"):
        with threads.threads_override(0):
            pass
    for command in (["demo"], ["compress", "r.yaml"], ["sensitivity", "r.yaml"], ["search", "r.yaml"]):
        assert build_parser().parse_args([*command, "--threads", "2"]).threads == 2


def test_compression_never_adds_parameters_codebooks_and_steps_are_counted_apart():
    torch.manual_seed(0)
    model = LeNet300()
    before = count_params(model)[0]
    shared = torchslim.quantize(model, torchslim.WeightSharing(bits=4, finetune=None))
    assert count_params(shared)[0] == before  # one code per weight, as many as there were weights
    assert count_tables(shared) == 3 * 16  # a 4-bit codebook (16 values) per layer
    assert profile(shared, (torch.randn(2, 1, 28, 28),), latency=False).table_params == 3 * 16
    assert count_tables(model) == 0
