from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..data.batches import as_example_inputs, batch_size, call_model, to_device
from ..nn.masks import effective, masked_names
from .evaluate import model_device


@dataclasses.dataclass
class Profile:
    params: int
    nonzero_params: int
    table_params: int
    macs: int
    latency_ms: float | None
    size_bytes: int | None
    device: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _effective_params(model: nn.Module):
    """Parameters as the model uses them: ``weight_orig * weight_mask`` for masked layers; lookup tables and
    quantization steps (a module's ``table_params``) left out."""
    seen = set()
    for module in model.modules():
        masked = {f"{name}_orig": name for name in masked_names(module)}
        tables = set(getattr(module, "table_params", ()))
        for name, p in list(module.named_parameters(recurse=False)):
            if name in tables:
                seen.add(id(p))
                continue
            if name in masked:
                yield p, effective(module, masked[name]).detach()
                seen.add(id(p))
                continue
            if id(p) not in seen:
                seen.add(id(p))
                yield p, p.detach()


def count_tables(model: nn.Module) -> int:
    """Entries of the model's lookup tables and quantization steps (codebooks, learned step sizes: what a module
    names in ``table_params``), which :func:`count_params` leaves out so that compression never adds parameters."""
    seen, total = set(), 0
    for module in model.modules():
        for name in getattr(module, "table_params", ()):
            p = module._parameters.get(name)
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def count_params(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters) the model computes with: masked weights count as zero, quantized weights
    held as integer code buffers (2-D or more, int8 to int32, e.g. ``weight_codes``) count as parameters, and codebooks and
    quantization steps do not (see :func:`count_tables`)."""
    total = nonzero = 0
    for p, eff in _effective_params(model):
        total += p.numel()
        nonzero += int(torch.count_nonzero(eff).item())
    for b in model.buffers():
        # int64 buffers are indices (position ids, token type ids), not weights stored as codes.
        if b.dim() >= 2 and not b.dtype.is_floating_point and b.dtype not in (torch.bool, torch.int64):
            total += b.numel()
            nonzero += int(torch.count_nonzero(b).item())
    return total, nonzero


def _native_attention_flops(query, key, value, embed_dim, *args, out_shape=None, **kwargs) -> int:
    """nn.MultiheadAttention's fused inference kernel: q/k/v and output projections plus the two products."""
    b, l, e = query
    s = key[1]
    return 2 * (2 * b * l * e * e + 2 * b * s * e * e + 2 * b * l * s * e)


# Kernels torch's counter does not know: without them attention would count as free.
_ATTENTION_FLOPS = {
    torch.ops.aten._native_multi_head_attention: _native_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
}


def count_macs(model: nn.Module, example_inputs) -> int:
    """Multiply-accumulates of one forward pass on ``example_inputs`` (a tensor, a tuple of positional inputs or
    a dict of keyword inputs), counted by ``torch.utils.flop_counter`` (FLOPs / 2).

    Models that run outside PyTorch's operators (a quantized ONNX graph) record their work per sample in
    ``model.info["macs_per_sample"]``, since the counter cannot see inside them."""
    example_inputs = as_example_inputs(example_inputs)
    info = getattr(model, "info", None)
    if isinstance(info, dict) and info.get("macs_per_sample") is not None:
        return int(info["macs_per_sample"]) * batch_size(example_inputs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_ATTENTION_FLOPS) as counter:
            call_model(model, example_inputs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops() // 2)


@torch.no_grad()
def _latency_times(model: nn.Module, example_inputs, warmup: int, repeats: int, min_seconds: float = 0.0
                   ) -> list[float]:
    """Wall times (s) of single forward passes after ``warmup`` runs (CUDA-synchronised)."""
    device = model_device(model)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    was_training = model.training
    model.eval()
    try:
        for _ in range(warmup):
            call_model(model, example_inputs)
        sync()
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < repeats or time.perf_counter() - start < min_seconds:
            t0 = time.perf_counter()
            call_model(model, example_inputs)
            sync()
            times.append(time.perf_counter() - t0)
    finally:
        model.train(was_training)
    return times


def measure_latency(model: nn.Module, example_inputs, warmup: int = 5, repeats: int = 30,
                    min_seconds: float = 0.0) -> float:
    """Median wall time of one forward pass on ``example_inputs`` (a tensor, tuple or dict) in milliseconds,
    after ``warmup`` runs (CUDA-synchronised)."""
    times = _latency_times(model, as_example_inputs(example_inputs), warmup, repeats, min_seconds)
    return statistics.median(times) * 1e3


# A measurement whose repeats spread by more than this (interquartile range / median), or taken while the load
# average exceeds the cores, is flagged as noisy in reports.
NOISY_SPREAD = 0.25


def compare_latency(models: dict[str, nn.Module], example_inputs, rounds: int = 3,
                    repeats: int = 20, noise: dict | None = None) -> dict[str, float]:
    """Latency (ms) of several models measured side by side: rounds interleave the models so that machine
    noise hits all alike, and each model keeps its best round's median.

    ``noise`` (a dict) receives how trustworthy the numbers are: per model the interquartile range of all its
    repeats over their median (``spread``), the 1-minute load average before and after, the CPU count, and
    ``noisy`` (a spread above 25% or a load average above the CPU count)."""
    best = {name: float("inf") for name in models}
    samples: dict[str, list[float]] = {name: [] for name in models}
    example_inputs = as_example_inputs(example_inputs)
    inputs = {name: to_device(example_inputs, model_device(m)) for name, m in models.items()}
    load_before = _load_average()
    for _ in range(rounds):
        for name, model in models.items():
            times = _latency_times(model, inputs[name], 5, repeats)
            samples[name] += times
            best[name] = min(best[name], statistics.median(times) * 1e3)
    if noise is not None:
        load = max(x for x in (load_before, _load_average(), -1.0) if x is not None)
        cores = os.cpu_count() or 1
        spread = {name: _iqr_over_median(t) for name, t in samples.items()}
        noise.update(spread=spread, load_average=None if load < 0 else load, cpus=cores,
                     noisy=max(spread.values()) > NOISY_SPREAD or load > cores)
    return best


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # not on every platform
        return None


def _iqr_over_median(times: list[float]) -> float:
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return (q[2] - q[0]) / q[1] if q[1] > 0 else 0.0


def profile(model: nn.Module, example_inputs, *, latency: bool = True, repeats: int = 30,
            size_fn: Callable[[nn.Module], int] | None = None) -> Profile:
    """Params, non-zero params, MACs, median latency (ms) and ``size_fn(model)`` bytes of ``model``.

    ``example_inputs`` (a tensor, a tuple of positional inputs or a dict of keyword inputs) are moved to the
    model's device; latency is measured on that device. Without ``size_fn``, ``size_bytes`` is None (``torchslim.profile`` passes the saved checkpoint's size).
    """
    device = model_device(model)
    example_inputs = to_device(as_example_inputs(example_inputs), device)
    params, nonzero = count_params(model)
    return Profile(
        params=params,
        nonzero_params=nonzero,
        table_params=count_tables(model),
        macs=count_macs(model, example_inputs),
        latency_ms=measure_latency(model, example_inputs, repeats=repeats) if latency else None,
        size_bytes=size_fn(model) if size_fn is not None else None,
        device=str(device),
    )
