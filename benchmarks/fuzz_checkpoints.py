"""Checkpoint fuzzing: mutated ``.slim`` files must load back identical or fail with a CheckpointError.

A seeded corpus covers every tensor encoding (dense, bitmask, relative, intpack, huffman, ans) and the file
kinds that use them (pruned, QAT 4-bit, ternary, weight-shared, int8 static and dynamic). Each case mutates
one file (random byte flips, truncation, appended bytes, manifest edits with the sha256 recomputed: shapes,
counts and sizes out of range, foreign callables, oversized factory arguments, deep nesting) and loads it in
a forked child under a time limit. Outcomes: ``checkpoint_error``, ``identical`` (the saved model's tensors
and outputs), ``different`` (loaded, but not the saved model), ``foreign_exception`` (any other exception),
``hang`` (over the time limit), ``crash`` (the child died) and ``code_execution`` (a foreign callable ran:
its marker file appeared). Peak memory is the child's maximum resident set above the parent's, compared with
the file's size plus the model's.

    python benchmarks/fuzz_checkpoints.py [--quick] [--out DIR] [--cases N]
"""

from __future__ import annotations

import json
import os
import random
import select
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, parse_args, print_table, write_json  # noqa: E402

from torchslim import (  # noqa: E402
    QAT,
    DynamicQuantization,
    StaticQuantization,
    TernaryWeights,
    TrainConfig,
    UnstructuredPruning,
    WeightSharing,
    prune,
    quantize,
)
from torchslim.core.errors import CheckpointError  # noqa: E402
from torchslim.export.checkpoint import load, save  # noqa: E402
from torchslim.export.checkpoint.compact import manifest_text  # noqa: E402
from torchslim.export.checkpoint.format import pack, pack_text, split  # noqa: E402
from torchslim.models import LeNet5  # noqa: E402

TIME_LIMIT = 5.0
MEMORY_FACTOR = 4
MEMORY_SLACK = 4 * 2**20
_FAST = TrainConfig(epochs=1, max_steps=2, progress=False)


# ----------------------------------------------------------------------------------------------
# The corpus


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))


def _data(shape: tuple[int, ...]) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, *shape, generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, 10, (32,), generator=g)), batch_size=8)


def build_corpus(folder: Path, *, int8: bool = True) -> dict[str, tuple[Path, torch.Tensor]]:
    """The seed files: name -> (path, example input). Deterministic."""
    torch.manual_seed(0)
    mlp_x, conv_x = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 28, 28)
    mlp_data, conv_data = _data((1, 8, 8)), _data((1, 28, 28))
    dense = _mlp()
    pruned = prune(dense, UnstructuredPruning(sparsity=0.85))
    shared = quantize(pruned, WeightSharing(bits=4), data=mlp_data)
    lenet = LeNet5(width=0.25).eval()
    models: list[tuple[str, nn.Module, torch.Tensor, dict[str, Any]]] = [
        ("dense", dense, mlp_x, {}),
        ("pruned_bitmask", pruned, mlp_x, {"encodings": ["bitmask"]}),
        ("pruned_relative", pruned, mlp_x, {"encodings": ["relative"]}),
        ("shared_huffman", shared, mlp_x, {"encodings": ["huffman"]}),
        ("shared_ans", shared, mlp_x, {"encodings": ["ans"]}),
        ("qat4", quantize(_mlp(), QAT(bits=4, activation_bits=8, train=_FAST), data=mlp_data), mlp_x, {}),
        ("ternary", quantize(_mlp(), TernaryWeights(train=_FAST), data=mlp_data), mlp_x, {}),
        ("lenet5", lenet, conv_x, {}),
        ("int8_dynamic", quantize(_mlp(), DynamicQuantization()), mlp_x, {}),
    ]
    if int8:
        static = quantize(lenet, StaticQuantization(calibration_batches=2), data=conv_data, example_inputs=conv_x)
        models.append(("int8_static", static, conv_x, {}))
    corpus = {}
    for name, model, x, kw in models:
        path = save(model.eval(), folder / f"{name}.slim", overwrite=True, **kw)
        corpus[name] = (path, x)
    return corpus


def fingerprint(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """What "identical" compares: module structure, every tensor, and the output on ``x`` (eval mode)."""
    model.eval()
    with torch.no_grad():
        out = model(x)
    return {"structure": [(n, type(m).__qualname__) for n, m in model.named_modules()],
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "out": out}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a["structure"] != b["structure"] or a["state"].keys() != b["state"].keys():
        return False
    for k, v in a["state"].items():
        w = b["state"][k]
        if v.dtype != w.dtype or v.shape != w.shape or not torch.equal(v, w):
            return False
    return torch.equal(a["out"], b["out"])


# ----------------------------------------------------------------------------------------------
# Mutations


def _split(data: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    return split(data)


def _join(manifest: dict[str, Any], stored: dict[str, torch.Tensor]) -> bytes:
    """A well-formed file with the sha256 recomputed, as an attacker would write it."""
    return pack(manifest, stored)


_FOREIGN = [("os:system", "command"), ("subprocess:getoutput", "cmd"), ("posix:system", "command"),
            ("builtins:eval", "source"), ("builtins:exec", "source"), ("os:popen", "cmd"),
            ("torchslim.core.files:atomic_write", "path"), ("importlib:import_module", "name")]
# Out of range for every field of the corpus' files (its tensors have far fewer elements than 46341), so a
# file edited with them must be refused; an in-range edit with the sha256 recomputed is just another valid file.
_HUGE = [46341, 10**6, 2**31, 2**40, -1, 10**18, -2**70]


def _big(rng: random.Random) -> Any:
    return rng.choice([*_HUGE, rng.randint(10**6, 10**7), 1.5, "7", None, [3], {}])


def _edit_shape(m: dict, st: dict, rng: random.Random, marker: str) -> None:
    entry = rng.choice(list(m["tensors"].values()))
    shape = entry["shape"]
    choice = rng.randrange(5)
    if choice == 0 or not shape:
        entry["shape"] = [46341, 46341]
    elif choice == 1:
        shape[rng.randrange(len(shape))] = _big(rng)
    elif choice == 2:
        shape[rng.randrange(len(shape))] += rng.choice([-1, 1])
    elif choice == 3:
        entry["shape"] = shape[::-1] + [1] * rng.randrange(3)
    else:
        entry["shape"] = [2] * rng.randint(40, 200)


def _edit_meta(m: dict, st: dict, rng: random.Random, marker: str) -> None:
    entries = [e for e in m["tensors"].values() if set(e) - {"encoding", "shape", "dtype", "parts"}]
    entry = rng.choice(entries or list(m["tensors"].values()))
    keys = [k for k in entry if k not in ("shape", "parts")]
    key = rng.choice(keys)
    if key == "sizes":
        entry["sizes"] = [_big(rng), entry["sizes"][1]] if rng.random() < 0.5 else entry["sizes"][::-1]
    elif key == "encoding":
        entry["encoding"] = rng.choice(["dense", "bitmask", "relative", "huffman", "ans", "intpack", "pickle"])
    elif key == "dtype":
        # Another float precision is another valid file (a model saved in double); these are all wrong.
        same_kind = entry["dtype"].startswith("float")
        entry["dtype"] = rng.choice(["load", "save", "float32x", "object", "int8" if same_kind else "float32",
                                     "uint8" if same_kind else "float16", "int16" if same_kind else "bool"])
    elif key == "zlib":
        entry["zlib"] = not entry["zlib"]
    elif key == "values":  # (None would mean "lo to lo + levels": another valid table)
        entry[key] = rng.choice([[], [2**70], list(range(300)), "x", {}])
    elif key in ("lo", "offset"):  # outside every integer dtype; an in-range shift is another valid file
        entry[key] = rng.choice([2**70, -2**70, 1.5, "7", None, [3]])
    else:
        entry[key] = _big(rng) if key != "width" else rng.choice([9, -1, "trit", 17, 0, "x", 1.5])


def _edit_parts(m: dict, st: dict, rng: random.Random, marker: str) -> None:
    name = rng.choice(list(st))
    t = st[name].reshape(-1)
    choice = rng.randrange(4)
    if choice == 0 and t.numel():
        st[name] = t[: rng.randrange(t.numel())].clone()
    elif choice == 1:
        st[name] = torch.cat([t, t[: max(1, t.numel() // 3)]]) if t.numel() else torch.zeros(5, dtype=t.dtype)
    elif choice == 2:
        st[name] = t.view(torch.uint8).clone() if t.dtype != torch.uint8 else t.to(torch.float32)
    else:
        size = rng.randint(1, 4096)
        size += size == t.numel()  # the same size could hold another valid tensor
        st[name] = torch.randint(0, 255, (size,), dtype=torch.uint8)


def _edit_factory(m: dict, st: dict, rng: random.Random, marker: str) -> None:
    name, arg = rng.choice(_FOREIGN)
    command = f"touch {marker}"
    payload = {"source": f"open({marker!r}, 'w')", "name": "antigravity"}.get(arg, command)
    m["arch"] = {"factory": name, "kwargs": {arg: payload}}


def _edit_module_type(m: dict, st: dict, rng: random.Random, marker: str) -> None:
    spec = {"type": rng.choice(["os.system", "builtins.eval", "Linear", "Sequential", "posix.system"]),
            "args": rng.choice([{"command": f"touch {marker}"}, {"in_features": 10**6, "out_features": 10**6},
                                {"in_features": 46341, "out_features": 46341, "bias": True}]),
            "children": rng.choice([[], [["0", {"type": "ReLU", "args": {"inplace": False}}]]])}
    path = rng.choice(["", "1", "0", "fc1", "conv1", "x.y"])
    m["modules"][path] = spec


def _edit_kwargs(m: dict, st: dict, rng: random.Random, marker: str) -> None:
    kwargs = m["arch"]["kwargs"]
    key = rng.choice([*kwargs, "num_classes", "width", "in_features", "graph_size", "extra"])
    kwargs[key] = rng.choice([10**6, 46341, 10**12, -5, 1e9, "x", [1] * 3])


def _edit_deep(m: dict, st: dict, rng: random.Random, marker: str) -> None:
    depth = rng.choice([100, 1000, 50000])
    m["history"] = [json.loads("[" * 50 + "]" * 50)] if depth == 100 else "__DEEP__%d" % depth


def _edit_benign(m: dict, st: dict, rng: random.Random, marker: str) -> None:
    m["metrics"] = {"accuracy": rng.random(), "note": "x" * rng.randrange(100)}


MANIFEST_EDITS: list[Callable[..., None]] = [_edit_shape, _edit_meta, _edit_parts, _edit_factory,
                                             _edit_module_type, _edit_kwargs, _edit_deep, _edit_benign]


def mutate(data: bytes, rng: random.Random, marker: str) -> tuple[str, bytes]:
    """One mutation of ``data``: its kind and the new bytes."""
    kind = rng.choice(["flip", "truncate", "append", "manifest", "manifest", "manifest"])
    if kind == "flip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        return kind, bytes(out)
    if kind == "truncate":
        return kind, data[: rng.randrange(len(data))]
    if kind == "append":
        return kind, data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    manifest, stored = _split(data)
    edit = rng.choice(MANIFEST_EDITS)
    edit(manifest, stored, rng, marker)
    deep = manifest.get("history")
    if isinstance(deep, str) and deep.startswith("__DEEP__"):
        # Deeply nested JSON no encoder writes, spliced into the manifest text (no sha256 can cover it).
        manifest["history"] = []
        return edit.__name__, _splice_deep(manifest, stored, int(deep[8:]))
    return edit.__name__, _join(manifest, stored)


def _splice_deep(manifest: dict[str, Any], stored: dict[str, torch.Tensor], n: int) -> bytes:
    body = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "sha256")}
    text = manifest_text(body, stored).replace('"h":[]', '"h":' + "[" * n + "]" * n)
    return pack_text(text, stored)


# ----------------------------------------------------------------------------------------------
# Running a case in a forked child


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _child(path: Path, reference: dict[str, Any], x: torch.Tensor, write_fd: int) -> None:
    try:  # reset the peak resident set inherited from the parent (Linux: "5" resets VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    start_kb = _status_kb("VmRSS")
    try:
        model = load(path)
        outcome = "identical" if _same(fingerprint(model, x), reference) else "different"
        detail = ""
    except CheckpointError as exc:
        outcome, detail = "checkpoint_error", str(exc)[:600]
    except BaseException as exc:  # noqa: BLE001 - what the fuzzer is looking for
        outcome, detail = "foreign_exception", f"{type(exc).__name__}: {str(exc)[:200]}"
    peak = max(0, _status_kb("VmHWM") - start_kb) * 1024
    os.write(write_fd, json.dumps({"outcome": outcome, "detail": detail, "peak_bytes": peak}).encode()[:60000])
    os._exit(0)


def run_case(path: Path, reference: dict[str, Any], x: torch.Tensor, marker: Path,
             time_limit: float = TIME_LIMIT) -> dict[str, Any]:
    """Load ``path`` in a forked child; the outcome, its detail and the child's peak memory above ours."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            _child(path, reference, x, write_fd)
        finally:
            os._exit(1)
    os.close(write_fd)
    start, chunks = time.monotonic(), []
    timed_out = False
    while True:
        left = time_limit - (time.monotonic() - start)
        if left <= 0:
            timed_out = True
            break
        ready, _, _ = select.select([read_fd], [], [], left)
        if ready:
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    if timed_out:
        os.kill(pid, 9)
    _, status = os.waitpid(pid, 0)
    os.close(read_fd)
    seconds = time.monotonic() - start
    if timed_out:
        result = {"outcome": "hang", "detail": f"over {time_limit} s", "peak_bytes": 0}
    elif not chunks:
        result = {"outcome": "crash", "detail": f"exit status {status}", "peak_bytes": 0}
    else:
        result = json.loads(b"".join(chunks))
    if marker.exists():
        marker.unlink()
        result = {"outcome": "code_execution", "detail": result.get("detail", ""), "peak_bytes": 0}
    result["seconds"] = round(seconds, 3)
    return result


def fuzz(n_cases: int, seed: int, folder: Path, *, int8: bool = True, keep: Path | None = None,
         log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``n_cases`` mutations over the corpus; counts of outcomes overall, per mutation and per file
    (failing cases are copied to ``keep`` when given)."""
    torch.set_num_threads(1)  # forked children must not inherit a busy OpenMP pool
    corpus = build_corpus(folder, int8=int8)
    refs = {name: fingerprint(load(path), x) for name, (path, x) in corpus.items()}
    seeds = {name: path.read_bytes() for name, (path, _) in corpus.items()}
    sizes = {name: len(b) + sum(t.numel() * t.element_size() for t in refs[name]["state"].values())
             for name, b in seeds.items()}
    marker = folder / "CODE_RAN"
    # What loading each unmutated file costs (about 20 MiB in a forked child whatever the file: allocator arenas,
    # ONNX Runtime sessions): a mutation may add at most MEMORY_FACTOR x (file + model) on top of it, plus
    # MEMORY_SLACK for fixed costs (allocator arenas, a rebuilt module and its traceback: up to ~1 MiB measured,
    # which dominates the ratio of a 9 KB file).
    clean = {name: run_case(path, refs[name], x, marker)["peak_bytes"] for name, (path, x) in corpus.items()}
    rng = random.Random(seed)
    outcomes: Counter = Counter()
    by_kind: dict[str, Counter] = {}
    by_file: dict[str, Counter] = {}
    foreign: list[str] = []
    worst_ratio, worst_excess, excess_max, over_bound, slowest, peak_max = 0.0, 0.0, 0, 0, 0.0, 0
    case_path = folder / "case.slim"
    for i in range(n_cases):
        name = rng.choice(sorted(corpus))
        kind, blob = mutate(seeds[name], rng, str(marker))
        case_path.write_bytes(blob)
        r = run_case(case_path, refs[name], corpus[name][1], marker)
        outcomes[r["outcome"]] += 1
        by_kind.setdefault(kind, Counter())[r["outcome"]] += 1
        by_file.setdefault(name, Counter())[r["outcome"]] += 1
        if r["outcome"] not in ("checkpoint_error", "identical") and len(foreign) < 20:
            foreign.append(f"case {i} {name}/{kind}: {r['outcome']} {r['detail']}")
            if keep is not None:  # for a closer look: the file and the seed it came from
                keep.mkdir(parents=True, exist_ok=True)
                (keep / f"case{i}-{name}.slim").write_bytes(blob)
                (keep / f"{name}.slim").write_bytes(seeds[name])
        worst_ratio = max(worst_ratio, r["peak_bytes"] / (len(blob) + sizes[name]))
        excess = r["peak_bytes"] - clean[name]
        worst_excess = max(worst_excess, excess / (len(blob) + sizes[name]))
        excess_max = max(excess_max, excess)
        over_bound += excess > MEMORY_FACTOR * (len(blob) + sizes[name]) + MEMORY_SLACK
        peak_max = max(peak_max, r["peak_bytes"])
        slowest = max(slowest, r["seconds"])
        if (i + 1) % 1000 == 0:
            log(f"  {i + 1}/{n_cases} cases: {dict(outcomes)}")
    return {"cases": n_cases, "seed": seed, "files": sorted(corpus), "outcomes": dict(outcomes),
            "by_mutation": {k: dict(v) for k, v in by_kind.items()},
            "by_file": {k: dict(v) for k, v in by_file.items()},
            "code_executions": outcomes["code_execution"], "hangs_over_5s": outcomes["hang"],
            "foreign_exceptions": outcomes["foreign_exception"], "crashes": outcomes["crash"],
            "different_models": outcomes["different"],
            "peak_memory_over_file_plus_model_max": round(worst_ratio, 3), "peak_memory_max_bytes": peak_max,
            "clean_load_peak_bytes": clean,
            "peak_memory_above_clean_load_over_file_plus_model_max": round(worst_excess, 3),
            "peak_memory_above_clean_load_max_bytes": excess_max,
            "memory_bound": f"{MEMORY_FACTOR} x (file + model) + {MEMORY_SLACK} bytes above the clean load",
            "cases_over_memory_bound": over_bound,
            "file_plus_model_bytes": sizes, "slowest_case_s": slowest,
            "examples": foreign}


def main(argv: list[str] | None = None) -> int:
    sys.argv[0] = "fuzz_checkpoints"
    cases_default = 500 if "--quick" in (argv or sys.argv[1:]) else 10_000
    args = parse_args("fuzz_checkpoints", "Fuzz torchslim checkpoints: every case must load back identical or "
                      "raise CheckpointError", argv)
    n = int(os.environ.get("FUZZ_CASES", cases_default))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        result = fuzz(n, seed=0, folder=Path(tmp), keep=Path(args.out) / "fuzz_failures")
    result["seconds"] = round(time.time() - start, 1)
    result["environment"] = environment(args)
    rows = [[k, v] for k, v in sorted(result["outcomes"].items())]
    rows += [["code executions", result["code_executions"]], ["hangs over 5 s", result["hangs_over_5s"]],
             ["foreign exceptions", result["foreign_exceptions"]], ["crashes", result["crashes"]],
             ["peak memory / (file + model), max", result["peak_memory_over_file_plus_model_max"]],
             ["peak memory of a case, max (MiB)", round(result["peak_memory_max_bytes"] / 2**20, 1)],
             ["peak memory above the clean file's load / (file + model), max",
              result["peak_memory_above_clean_load_over_file_plus_model_max"]],
             ["peak memory above the clean file's load, max (KiB)",
              round(result["peak_memory_above_clean_load_max_bytes"] / 1024, 1)],
             [f"cases over {MEMORY_FACTOR} x (file + model) + {MEMORY_SLACK // 2**20} MiB",
              result["cases_over_memory_bound"]],
             ["slowest case (s)", result["slowest_case_s"]]]
    print_table([{"outcome": k, "cases": v} for k, v in rows], ["outcome", "cases"])
    for line in result["examples"]:
        print(line)
    write_json(args, "fuzz_checkpoints", result)
    bad = result["code_executions"] + result["hangs_over_5s"] + result["foreign_exceptions"] + result["crashes"]
    return 1 if bad or result["cases_over_memory_bound"] or result["different_models"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
