"""Shared command-line handling and output for the benchmarks."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def parse_args(name: str, description: str, argv: list[str] | None = None,
               sections: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"benchmarks/{name}.py", description=description)
    if sections:
        parser.add_argument("--only", nargs="+", choices=sections, default=None,
                            help="run only these sections and merge them into an existing OUT/NAME.json")
    parser.add_argument("--quick", action="store_true", help="small sizes, a few minutes at most")
    parser.add_argument("--data-dir", default=None, help="folder holding mnist/ (default ../shared/datasets)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="output folder")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return args


def environment(args: argparse.Namespace) -> dict:
    return {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(), "quick": args.quick,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_json(args: argparse.Namespace, name: str, result: dict) -> Path:
    from torchslim.core.files import atomic_write

    path = Path(args.out) / f"{name}.json"
    atomic_write(path, (json.dumps(result, indent=2) + "\n").encode())
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _cell(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)
