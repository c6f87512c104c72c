"""Processes that run trials of one study: workers the search spawns on this machine (``workers`` > 1), and
``--worker`` processes elsewhere that wait for their coordinator's baseline and study, then join it."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..core.threads import threads_per_worker
from ..metrics.significance import Judge, count_samples
from ..pipeline.recipe import Recipe, build_data, load_checkpoint, metric_function
from .options import SearchOptions
from .problem import Problem
from .storage import StorageError, is_described, open_storage, open_study, redact, tpe_sampler
from .strategies import optimize, quiet_optuna

__all__ = ["run_workers", "worker_main", "wait_for", "join_study"]

WORKER_WAIT_S = 1800  # how long a --worker waits for its coordinator's baseline and study


def wait_for(ready: Callable[[], Any], what: str, log: Callable[[str], None]) -> Any:
    """Poll ``ready()`` until it returns something truthy: workers may start before their coordinator."""
    deadline = time.monotonic() + WORKER_WAIT_S
    waiting = False
    while not (value := ready()):
        if time.monotonic() > deadline:
            raise StorageError(f"gave up after {WORKER_WAIT_S} s waiting for {what}; start the coordinating search "
                               "(torchslim search without --worker) with the same recipe, --out and --storage")
        if not waiting:
            log(f"waiting for {what}")
            waiting = True
        time.sleep(2)
    return value


def join_study(storage, name: str, url: str, sampler, log: Callable[[str], None]):
    """The study ``name`` once its coordinator has created and described it."""
    def described():
        try:
            study = open_study(storage, name, sampler, create=False)
        except StorageError:
            return None
        return study if is_described(study) else None

    return wait_for(described, f"study {name!r} in {redact(url)}", log)


def run_workers(problem: Problem, study, recipe: Recipe, options: SearchOptions, baseline_path: Path,
                save_kw: dict, floor: float, log: Callable[[str], None] | None = None) -> list[str]:
    """This process plus ``options.workers - 1`` spawned ones run trials against the storage (``options`` is
    resolved: every field set); returns the workers' errors."""
    n = options.workers
    procs = []
    own_threads = torch.get_num_threads()
    if n > 1:
        threads = threads_per_worker(n)  # the workers share the cores instead of oversubscribing them
        ctx = multiprocessing.get_context("spawn")
        for w in range(1, n):
            payload = {"recipe": recipe, "baseline": str(baseline_path), "objective": options.objective,
                       "save_kw": save_kw, "storage": options.storage, "study_name": options.study_name,
                       "trials": options.trials, "worker": w, "seed": recipe.seed + w, "floor": floor,
                       "max_drop": options.max_accuracy_drop, "confidence": options.confidence, "threads": threads,
                       "trusted": _saved_by(problem.baseline, save_kw), "max_latency_ratio": options.max_latency_ratio}
            p = ctx.Process(target=worker_main, args=(payload,), daemon=False)
            p.start()
            procs.append(p)
        torch.set_num_threads(threads)
    try:
        optimize(problem, study, options.trials, worker=0, floor=floor, progress=options.progress, log=log)
    finally:
        for p in procs:
            p.join()
        torch.set_num_threads(own_threads)
    return [f"worker {i + 1} exited with code {p.exitcode}" for i, p in enumerate(procs) if p.exitcode != 0]


def _saved_by(baseline: nn.Module, save_kw: dict) -> tuple[str, ...]:
    """The factory the coordinator saved its baseline with: trusted by the workers it spawns, which load that
    file (a Python model may come from code no recipe names)."""
    factory = save_kw.get("factory")
    if isinstance(factory, str):
        return (factory,)
    cls = type(baseline)
    return (f"{cls.__module__}:{cls.__qualname__}",)


@quiet_optuna
def worker_main(payload: dict[str, Any]) -> None:
    """A spawned worker process: rebuild the problem from the recipe and the coordinator's baseline, run trials."""
    torch.set_num_threads(payload["threads"])
    os.environ.setdefault("TQDM_DISABLE", "1")
    recipe: Recipe = payload["recipe"]
    data = build_data(recipe)
    baseline = load_checkpoint(recipe, payload["baseline"], trusted=payload["trusted"])
    metric_fn = metric_function(recipe)
    judge = Judge(baseline, data.val, payload["max_drop"], metric_fn=metric_fn, confidence=payload["confidence"],
                  holdout=count_samples(data.test))
    problem = Problem(recipe, baseline, data, objective=payload["objective"], metric_fn=metric_fn,
                      save_kw=payload["save_kw"], judge=judge, max_latency_ratio=payload.get("max_latency_ratio"))
    storage = open_storage(payload["storage"])
    study = open_study(storage, payload["study_name"], tpe_sampler(payload["seed"]), create=False)
    optimize(problem, study, payload["trials"], payload["worker"], payload["floor"], progress=False)
