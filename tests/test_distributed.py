"""Scale-out on CPU: 2-process DDP fine-tuning (gloo) against 1 process, and 2 search workers on one storage."""

import json
import os

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from torchslim import TrainConfig, evaluate, train
from torchslim.data import digits
from torchslim.models import LeNet300
from torchslim.training import distributed
from torchslim.training.distributed import launch_local, shard_loader

CONFIG = TrainConfig(epochs=2, lr=2e-3, progress=False)


def _data():
    return digits(image_size=8, batch_size=64, seed=0)


def _model() -> LeNet300:
    torch.manual_seed(0)
    return LeNet300(in_features=64)


def _ddp_worker(out: str) -> None:
    """Runs in each of the spawned processes (rank from the torchrun-style environment)."""
    torch.set_num_threads(1)
    data = _data()
    model = _model()
    train(model, data.train, CONFIG)  # plain train: under torchrun it hands over to train_distributed
    if int(os.environ["RANK"]) == 0:
        torch.save(model.state_dict(), out)
    else:
        torch.save(model.state_dict(), out + ".rank1")


def test_sharding_keeps_the_global_batch():
    ds = TensorDataset(torch.arange(10).float(), torch.arange(10))
    loader = DataLoader(ds, batch_size=4, shuffle=True)
    one = [b[1].tolist() for b in shard_loader(loader, rank=0, world_size=1, seed=3)]
    two = [shard_loader(loader, rank=r, world_size=2, seed=3) for r in (0, 1)]
    assert len(two[0]) == len(one) == 3 and two[0].loader.batch_size == 2
    merged = [sorted(a[1].tolist() + b[1].tolist()) for a, b in zip(*two)]
    assert merged == [sorted(b) for b in one]  # step k of 2 processes sees exactly batch k of 1 process
    assert [b[1].tolist() for b in shard_loader(loader, rank=0, world_size=1, seed=3)] == one
    again = shard_loader(loader, rank=0, world_size=1, seed=3)
    next(iter(again))
    assert [b[1].tolist() for b in again] != one  # each pass reshuffles (set_epoch)
    with pytest.raises(Exception, match="not divisible by 3 processes"):
        shard_loader(loader, rank=0, world_size=3)

    class View:  # e.g. distillation's relabelling view over a DataLoader
        def __init__(self, inner):
            self.loader = inner

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            return iter(self.loader)

    view = View(loader)
    sharded = shard_loader(view, rank=1, world_size=2, seed=3)
    assert sharded.loader is not loader and view.loader is loader and len(sharded) == 3
    fresh = shard_loader(loader, rank=1, world_size=2, seed=3)
    assert [b[1].tolist() for b in sharded] == [b[1].tolist() for b in fresh]
    with pytest.raises(Exception, match="shards a torch DataLoader"):
        shard_loader([1, 2], rank=0, world_size=2)


def test_two_process_ddp_matches_one_process(tmp_path):
    out = str(tmp_path / "ddp.pt")
    launch_local(_ddp_worker, 2, out)
    ddp_model = _model()
    ddp_model.load_state_dict(torch.load(out))
    rank1 = torch.load(out + ".rank1")
    assert all(torch.equal(v, rank1[k]) for k, v in ddp_model.state_dict().items())  # replicas stay identical

    data = _data()
    single = _model()
    torch.set_num_threads(1)
    train(single, shard_loader(data.train, rank=0, world_size=1, seed=0), CONFIG)
    a, b = evaluate(ddp_model, data.test), evaluate(single, data.test)
    assert abs(a - b) <= 0.003, (a, b)  # within 0.3 point
    for k, v in single.state_dict().items():
        assert torch.allclose(v, ddp_model.state_dict()[k], atol=1e-3), k
    untrained = evaluate(_model(), data.test)
    assert a > untrained + 0.5  # it did train


RECIPE = """\
model: {builtin: lenet300, kwargs: {in_features: 64}, train: {epochs: 3, lr: 3.0e-3, progress: false}}
data: {builtin: digits, kwargs: {image_size: 8, batch_size: 64}}
budget: {max_accuracy_drop: 0.05}
guard: {policy: warn}                               # no retries: the count below is of the stages' runs
stages:
  - name: prune
    type: UnstructuredPruning
    sparsity: 0.8
    schedule: {kind: oneshot, finetune: {epochs: 2, lr: 1.0e-3, progress: false}}
  - {name: share, type: WeightSharing, bits: 5}     # int16 codes, which gloo cannot broadcast
  - {name: finetune, type: Finetune, train: {epochs: 1, lr: 5.0e-4, progress: false}}
"""


def _recipe_worker(recipe: str, out: str) -> None:
    """``torchslim compress`` as one torchrun process, counting the data-parallel training runs."""
    from torchslim.pipeline.commands import run_recipe

    torch.set_num_threads(1)
    calls = []
    inner = distributed.train_distributed
    distributed.train_distributed = lambda *a, **k: calls.append(1) or inner(*a, **k)
    report = run_recipe(recipe, out, log=lambda s: None)  # every rank runs it; rank 0 writes the outputs
    with open(f"{out}-calls{distributed.rank()}", "w") as f:
        json.dump({"calls": len(calls), "accuracy": report["compressed"]["accuracy"]}, f)


def test_recipe_stages_train_data_parallel_under_torchrun(tmp_path):
    from torchslim.pipeline.commands import run_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    out = str(tmp_path / "ddp")
    launch_local(_recipe_worker, 2, str(recipe), out)
    ranks = [json.loads(open(f"{out}-calls{r}").read()) for r in (0, 1)]
    assert ranks[0]["calls"] == ranks[1]["calls"] == 3  # baseline training, pruning's fine-tuning, finetune stage
    assert ranks[0]["accuracy"] == ranks[1]["accuracy"]  # replicas stay identical
    report = json.loads((tmp_path / "ddp" / "report.json").read_text())
    torch.set_num_threads(1)
    single = run_recipe(recipe, tmp_path / "single", log=lambda s: None)
    # Same global batch, different sample order (DistributedSampler vs the loader's own shuffling).
    assert abs(report["compressed"]["accuracy"] - single["compressed"]["accuracy"]) <= 0.02


def test_two_search_workers_share_one_storage(tmp_path):
    from torchslim import SearchOptions, search

    recipe = tmp_path / "r.yaml"
    recipe.write_text("""\
model: {builtin: lenet300, kwargs: {in_features: 64}, train: {epochs: 4, lr: 3.0e-3, progress: false}}
data: {builtin: digits, kwargs: {image_size: 8, val_fraction: 0.25}}
budget: {max_accuracy_drop: 0.03}
stages:
  - {name: prune, type: UnstructuredPruning, sparsity: 0.9, check: false}
  - {name: finetune, type: Finetune, train: {epochs: 6, lr: 1.0e-3, progress: false}}
""")
    r = search(recipe, tmp_path / "out", SearchOptions(strategy="optuna", trials=20, workers=2, progress=False),
               log=lambda s: None)
    assert r.n_complete >= 20 and not r.report["search"]["worker_errors"]
    import optuna

    study = optuna.load_study(study_name=r.study_name, storage=f"sqlite:///{tmp_path / 'out' / 'search.db'}")
    workers = {t.user_attrs.get("worker") for t in study.trials if t.state.name == "COMPLETE"}
    assert workers == {0, 1}, workers  # both processes ran trials against the one storage
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["search"]["n_trials_complete"] == r.n_complete and rep["budget"]["met_val"]


SEARCH_RECIPE = """\
model: {builtin: lenet300, kwargs: {in_features: 64}, train: {epochs: 4, lr: 3.0e-3, progress: false}}
data: {builtin: digits, kwargs: {image_size: 8, val_fraction: 0.25}}
budget: {max_accuracy_drop: 0.03}
search: {strategy: optuna, trials: 12}
stages:
  - {name: prune, type: UnstructuredPruning, sparsity: 0.9, check: false}
  - {name: finetune, type: Finetune, train: {epochs: 3, lr: 1.0e-3, progress: false}}
"""


@pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR")
def test_search_worker_on_another_machine_through_postgresql(tmp_path):
    """The README's several-machines recipe, on one machine: a coordinator and a --worker process sharing a
    PostgreSQL study (a throw-away server) and an output folder; the worker is started first and waits."""
    import subprocess
    import sys
    import tempfile

    import optuna
    import pgserver

    pgdata = tempfile.mkdtemp(prefix="pg", dir="/tmp")  # short: the server's socket path has a length limit
    try:
        server = pgserver.get_server(pgdata, cleanup_mode="delete")
    except Exception as exc:  # noqa: BLE001  (a machine that cannot run a PostgreSQL server at all)
        pytest.skip(f"cannot start a local PostgreSQL server here: {exc}")
    try:
        server.psql("CREATE DATABASE torchslim;")
        url = f"postgresql+psycopg://postgres:@/torchslim?host={pgdata}"
        (tmp_path / "r.yaml").write_text(SEARCH_RECIPE)
        out = tmp_path / "shared"
        cmd = [sys.executable, "-m", "torchslim.cli", "search", str(tmp_path / "r.yaml"), "--storage", url,
               "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
        worker = subprocess.Popen(cmd + ["--worker"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
        coordinator = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        worker_log = worker.communicate(timeout=300)[0]
        assert coordinator.returncode == 0, coordinator.stdout + coordinator.stderr
        assert worker.returncode == 0 and "waiting for" in worker_log, worker_log
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        name = optuna.get_all_study_names(url)[0]
        trials = [t for t in optuna.load_study(study_name=name, storage=url).trials if t.state.name == "COMPLETE"]
        workers = {t.user_attrs["worker"] for t in trials}
        assert len(trials) >= 12 and len(workers) == 2, workers  # both processes ran trials in the one study
        report = json.loads((out / "report.json").read_text())
        assert report["search"]["n_trials_complete"] >= 12 and "postgresql+psycopg://postgres:***@" in \
            report["search"]["storage"]
    finally:
        server.cleanup()  # stops the server and deletes its folder
