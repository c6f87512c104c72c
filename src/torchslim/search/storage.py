"""Where trials live: the Optuna storage (SQLite, PostgreSQL, MySQL...), the study in it and the description
that keeps a study from mixing trials of different recipes, objectives or baselines."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import TorchslimError
from ..core.files import process_alive

__all__ = ["StorageError", "open_storage", "open_study", "describe_study", "is_described", "redact", "tpe_sampler",
           "fingerprint", "params_key", "complete", "count_failed", "point", "owner_attrs", "fail_orphans"]

HEARTBEAT_S = 10
GRACE_S = 60
STUDY_ATTR = "torchslim"  # the study's user attribute holding its description


class StorageError(TorchslimError):
    """The Optuna storage URL is malformed, lacks its database driver, or cannot be reached."""


def redact(url: str) -> str:
    """``url`` with its password hidden, for messages and reports."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


def open_storage(url: str):
    """An Optuna RDB storage for ``url`` (SQLite file, PostgreSQL, MySQL...), with heartbeats so that trials of a
    killed process are failed and re-queued; raises StorageError naming the problem."""
    import optuna
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception as exc:
        raise StorageError(f"invalid storage URL {url!r} ({exc}); use e.g. sqlite:///search.db or "
                           "postgresql://user:password@host:5432/db") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        db = parsed.database
        if db and db != ":memory:" and not Path(db).parent.is_dir():
            raise StorageError(f"storage {url}: folder {Path(db).parent} does not exist; create it or choose "
                               "another path")
        engine = {"connect_args": {"timeout": 60}}
    else:
        engine = {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    for attempt in range(3):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2))
        except ImportError:
            driver = parsed.get_driver_name()
            raise StorageError(f"storage {redact(url)} needs the Python driver {driver!r} (SQLAlchemy dialect "
                               f"{backend}+{driver}), which is not installed: pip install it, or name an installed "
                               "driver in the URL (e.g. postgresql+psycopg2://..., mysql+pymysql://...)") from None
        except Exception as exc:
            # Two processes creating the tables of a new database at once: the loser retries and finds them.
            if "already exists" in str(exc) and attempt < 2:
                time.sleep(0.5 * (attempt + 1))
                continue
            raise StorageError(f"cannot reach storage {redact(url)}: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0]}; check host, port, credentials and that the database "
                               "exists, or use the default SQLite file") from None
    raise AssertionError("unreachable")


def tpe_sampler(seed: int):
    """Multi-objective TPE; trials carry their budget violation through ``set_constraint``."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)


def open_study(storage, name: str, sampler=None, create: bool = True):
    """The study ``name`` (metric maximised, objective minimised), created unless ``create`` is False."""
    import optuna

    try:
        if create:
            study = optuna.create_study(storage=storage, study_name=name, directions=["maximize", "minimize"],
                                        load_if_exists=True, sampler=sampler)
        else:
            study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:
        raise StorageError(f"no study {name!r} in the storage; start the coordinating search first "
                           "(torchslim search without --worker)") from None
    fail_orphans(study, storage)
    return study


def owner_attrs() -> dict[str, Any]:
    """The user attributes naming the process that runs a trial (see :func:`fail_orphans`)."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def fail_orphans(study, storage) -> list[int]:
    """Mark FAIL the RUNNING trials of ``study`` whose process (host and pid in their user attributes) is gone
    from this host: a killed search would otherwise leave them RUNNING for good (heartbeats only catch them
    after the grace period). Returns their numbers."""
    import optuna
    from optuna.trial import TrialState

    host, failed = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") != host or not isinstance(pid, int) or process_alive(pid):
            continue
        try:
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:  # finished by its owner meanwhile
            continue
        failed.append(t.number)
    return failed


def is_described(study) -> bool:
    """Whether the coordinator has described ``study`` yet (workers wait for that)."""
    return STUDY_ATTR in study.user_attrs


def describe_study(study, meta: dict[str, Any], name: str, url: str) -> None:
    """Store ``meta`` (recipe key, objective, knobs, baseline fingerprint) in a new study, or check that a stored
    study was measured the same way: its trials would not compare otherwise."""
    stored = study.user_attrs.get(STUDY_ATTR)
    if stored is None:
        study.set_user_attr(STUDY_ATTR, meta)
        return
    differs = [k for k, v in meta.items() if stored.get(k) != v]
    if differs:
        raise StorageError(f"study {name!r} in {redact(url)} was measured with a different "
                           f"{' and '.join(differs)} "
                           "(its trials would not compare); pass another --study-name or storage, or delete it")


def fingerprint(model: nn.Module) -> str:
    """sha256 of the model's state (names, shapes and values), to tell baselines apart."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def params_key(values: dict[str, float]) -> str:
    """A setting as a string, equal for equal settings (the fast strategy's lookup of stored trials)."""
    return json.dumps({k: round(float(v), 9) for k, v in sorted(values.items())})


def complete(study) -> list:
    """The study's finished trials."""
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def count_failed(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))


def point(trial) -> dict[str, Any]:
    """A finished trial as a point of the Pareto plot: ``{"trial", "metric", "objective", "params", "paired"}``,
    plus ``latency_ratio`` when the search measured it."""
    out = {"trial": trial.number, "metric": trial.values[0], "objective": trial.values[1],
           "params": dict(trial.params), "paired": trial.user_attrs.get("paired")}
    if trial.user_attrs.get("latency_ratio") is not None:
        out["latency_ratio"] = trial.user_attrs["latency_ratio"]
    return out
