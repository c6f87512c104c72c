"""Search spaces, sensitivity, the fast and Optuna strategies, resume, storage errors and the search report."""

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from torchslim import ConfigError, SearchOptions, StructuredPruning, UnstructuredPruning, evaluate
from torchslim.export.checkpoint import load
from torchslim.models import LeNet5, LeNet300
from torchslim.cli.commands import EXIT_BUDGET_MISSED, add_commands
from torchslim.pipeline.recipe import BudgetSpec, StageSpec, build_data, load_recipe
from torchslim.search.allocation import lagrangian_path
from torchslim.search.api import search
from torchslim.search.knobs import Knob, build_knobs, soften, stage_configs
from torchslim.search.pareto import choose, pareto_front
from torchslim.search.scan import sensitivity
from torchslim.search.storage import StorageError, open_storage

TINY = """\
name: tiny
model: {builtin: lenet300, kwargs: {in_features: 64}, train: {epochs: 6, lr: 3.0e-3, progress: false}}
data: {builtin: digits, kwargs: {image_size: 8, val_fraction: 0.25}}
budget: {max_accuracy_drop: 0.03}
stages:
  - name: prune
    type: UnstructuredPruning
    sparsity: 0.9
    SEARCH
  - {name: finetune, type: Finetune, train: {epochs: EPOCHS, lr: 1.0e-3, progress: false}}
"""
QUIET = {"log": lambda s: None}


def opts(**options) -> SearchOptions:
    return SearchOptions(progress=False, **options)


def tiny(tmp_path: Path, *, epochs: float = 1, search_line: str = "check: false", name: str = "tiny.yaml") -> Path:
    path = tmp_path / name
    path.write_text(TINY.replace("SEARCH", search_line).replace("EPOCHS", str(epochs)))
    return path


def complete_trials(db: Path) -> dict[int, tuple]:
    import optuna

    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    return {t.number: (tuple(t.values), tuple(sorted(t.params.items()))) for t in study.trials
            if t.state.name == "COMPLETE"}


def trial_states(db: Path, state: str) -> set[int]:
    import optuna

    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    return {t.number for t in study.trials if t.state.name == state}


def finished(db: Path, state: str = "COMPLETE", owned: bool = False) -> int:
    """Trials in ``state`` (with ``owned``, only those that already name their process), read without opening an
    Optuna storage (that would race the search creating its tables)."""
    import sqlite3

    if not db.exists():
        return 0
    query = "SELECT count(*) FROM trials WHERE state = ?"
    if owned:
        query += " AND trial_id IN (SELECT trial_id FROM trial_user_attributes WHERE key = 'pid')"
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute(query, (state,)).fetchone()[0]
    except sqlite3.Error:  # the tables are being created
        return 0


def test_search_space_knobs_and_configs():
    m = LeNet5()
    x = (torch.randn(1, 1, 28, 28),)
    stages = [StageSpec("u", UnstructuredPruning(0.5, exclude=("conv1",))), StageSpec("s", StructuredPruning(0.3)),
              StageSpec("frozen", UnstructuredPruning(0.5), search=False)]
    knobs = build_knobs(stages, m, x)
    assert [k.name for k in knobs] == ["u.sparsity[conv2]", "u.sparsity[fc1]", "u.sparsity[fc2]",
                                       "s.ratio[conv1]", "s.ratio[conv2]", "s.ratio[fc1]"]
    configs = stage_configs(stages, knobs, {"u.sparsity[fc1]": 0.95, "s.ratio[conv2]": 0.5})
    assert configs[0].sparsity == {"conv2": 0.0, "fc1": 0.95, "fc2": 0.0} and configs[0].scope == "layer"
    assert configs[1].ratio == {"conv1": 0.0, "conv2": 0.5, "fc1": 0.0} and configs[1].scope == "layer"
    assert configs[2] is stages[2].config
    assert soften(UnstructuredPruning({"fc1": 0.9}), 0.5).sparsity == {"fc1": 0.45}
    assert soften(StructuredPruning(0.6), 0.5).ratio == pytest.approx(0.3)


def test_search_space_covers_lowrank_and_quantization_configs():
    from torchslim.lowrank import SVD
    from torchslim.quantization.qat import QAT
    from torchslim.quantization.sharing import WeightSharing

    m = LeNet5()
    x = (torch.randn(1, 1, 28, 28),)
    stages = [StageSpec("svd", SVD(ratio=0.5, layers=("fc1",))), StageSpec("ws", WeightSharing(bits=5)),
              StageSpec("qat", QAT(bits=8))]
    knobs = {k.name: k for k in build_knobs(stages, m, x)}
    assert "svd.rank[fc1]" in knobs and "svd.rank[fc2]" not in knobs
    # After a decomposition renames layers, later per-layer fields would name stale layers: one knob instead.
    assert [n for n in knobs if n.startswith("ws.")] == ["ws.bits"] and knobs["qat.bits"].choices == (8, 6, 4, 3, 2)
    cfgs = stage_configs(stages, list(knobs.values()), {"svd.rank[fc1]": 0.25, "qat.bits": 4, "ws.bits": 6})
    assert cfgs[0].rank == {"fc1": 125} and cfgs[0].ratio is None  # a quarter of min(800, 500)
    assert cfgs[1].bits == 6 and cfgs[2].bits == 4
    mild = stage_configs(stages, list(knobs.values()), {})
    assert mild[0] is None and mild[1] is None  # every layer left alone: those stages do nothing
    ws = build_knobs([StageSpec("ws", WeightSharing(bits=5))], m, x)
    assert len(ws) == 4 and ws[0].mild == 0
    cfg = stage_configs([StageSpec("ws", WeightSharing(bits=5))], ws, {ws[0].name: 4, ws[1].name: 0})[0]
    assert cfg.bits == {"conv1": 4}
    assert soften(WeightSharing(bits={"fc1": 3}), 0.5).bits == {"fc1": 6}
    from torchslim.quantization.ptq import WeightOnly

    assert soften(WeightOnly(bits=2), 0.5).bits == 4 and soften(WeightOnly(bits=8), 0.5) is None


def test_lagrangian_path_runs_from_aggressive_to_mild():
    knobs = [Knob(0, "p", "sparsity", n, 0.0, 0.99, 0.0, (0.5, 0.9)) for n in ("big", "small")]
    sens = {"baseline": {"objective": 100.0},
            "knobs": {"p.sparsity[big]": [{"value": 0.5, "error": 0.01, "objective": 60.0},
                                          {"value": 0.9, "error": 0.05, "objective": 30.0}],
                      "p.sparsity[small]": [{"value": 0.5, "error": 0.2, "objective": 95.0},
                                            {"value": 0.9, "error": 0.9, "objective": 92.0}]}}
    path = lagrangian_path(knobs, sens)
    assert path[0] == {"p.sparsity[big]": 0.9, "p.sparsity[small]": 0.9}
    assert path[-1] == {"p.sparsity[big]": 0.0, "p.sparsity[small]": 0.0}
    # The cheap-to-compress big layer is pushed before the sensitive small one is touched.
    assert {"p.sparsity[big]": 0.9, "p.sparsity[small]": 0.0} in path
    big = [a["p.sparsity[big]"] for a in path]
    assert big == sorted(big, reverse=True)


def test_pareto_front_and_choice():
    pts = [{"metric": 0.9, "objective": 10}, {"metric": 0.95, "objective": 20}, {"metric": 0.85, "objective": 15},
           {"metric": 0.97, "objective": 40}]
    assert [p["objective"] for p in pareto_front(pts)] == [10, 20, 40]
    assert choose(pts, 0.93) == (pts[1], True)
    assert choose(pts, 0.99) == (pts[3], False)  # nothing meets it: the best found, flagged


def test_sensitivity_table_and_plot(tmp_path):
    from torchslim import TrainConfig, train
    from torchslim.data import digits

    data = digits(image_size=8, val_fraction=0.25)
    torch.manual_seed(0)
    model = LeNet300(in_features=64)
    train(model, data.train, TrainConfig(epochs=4, lr=3e-3, progress=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = sensitivity(model, data, sparsities=(0.5, 0.99), bits=(8, 2), layers=["fc2", "fc3"], progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    assert res.layers() == ["fc2", "fc3"] and len(res.rows) == 2 * 4
    row = {(r["layer"], r["kind"], r["value"]): r for r in res.rows}
    assert res.baseline == pytest.approx(evaluate(model, data.val))
    assert row[("fc3", "sparsity", 0.99)]["output_error"] > row[("fc3", "sparsity", 0.5)]["output_error"]
    assert row[("fc2", "bits", 2)]["output_error"] > row[("fc2", "bits", 8)]["output_error"] > 0
    assert row[("fc3", "sparsity", 0.99)]["drop"] > 0.1 and abs(row[("fc2", "bits", 8)]["drop"]) < 0.01
    paths = res.write(tmp_path)
    assert json.loads(paths["json"].read_text())["rows"] == res.rows
    assert "| fc2 |" in paths["markdown"].read_text() and paths["plot"].stat().st_size > 1000


def test_fast_search_meets_the_budget_and_reports(tmp_path):
    import torchslim

    out = tmp_path / "out"
    r = torchslim.search(tiny(tmp_path), out, opts(), **QUIET)  # the package is callable; its submodules still import
    assert r.feasible and r.chosen["metric"] >= r.report["search"]["floor"]
    rep = json.loads((out / "report.json").read_text())
    assert rep["budget"]["met_val"] and rep["search"]["strategy"] == "fast"
    assert rep["search"]["chosen"]["rerun_val"] == pytest.approx(r.chosen["metric"])  # deterministic re-run
    assert rep["compressed"]["size_bytes"] == (out / "model.slim").stat().st_size
    assert rep["compressed"]["size_bytes"] < rep["baseline"]["size_bytes"] / 2
    assert set(r.chosen["params"]) == {"prune.sparsity[fc1]", "prune.sparsity[fc2]", "prune.sparsity[fc3]"}
    data = build_data(load_recipe(tmp_path / "tiny.yaml"))
    model = load(out / "model.slim")
    assert evaluate(model, data.test) == pytest.approx(rep["compressed"]["accuracy"])
    assert evaluate(model, data.val) == pytest.approx(r.chosen["metric"])
    assert (out / "pareto.png").stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "## Search" in md and "![Pareto front](pareto.png)" in md and "| prune.sparsity[fc1] |" in md
    assert not list(out.glob(".publish-*"))


def test_fast_search_resumes_without_repeating_finished_trials(tmp_path):
    out = tmp_path / "out"
    recipe = tiny(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        search(recipe, out, opts(stop_after=2), **QUIET)
    first = complete_trials(out / "search.db")
    assert len(first) == 2 and not (out / "report.json").exists()
    lines: list[str] = []
    r = search(recipe, out, opts(), log=lines.append)
    after = complete_trials(out / "search.db")
    assert all(after[n] == v for n, v in first.items())  # kept, unchanged
    assert sum("(stored)" in s for s in lines) >= 2 and any("reusing the baseline" in s for s in lines)
    fresh = search(recipe, tmp_path / "fresh", opts(), **QUIET)  # the same search uninterrupted chooses the same
    assert fresh.chosen["params"] == r.chosen["params"] and fresh.chosen["metric"] == r.chosen["metric"]


def test_optuna_search_survives_being_killed(tmp_path):
    recipe = tiny(tmp_path, epochs=2)
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        from torchslim import SearchOptions, search
        search({str(recipe)!r}, {str(out)!r}, SearchOptions(strategy="optuna", trials=40, progress=False),
               log=lambda s: None)
    """)
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            # Killed while a trial runs: that trial must not stay RUNNING. The process is paused before the check so
            # that the trial checked is the one killed; a trial killed in the milliseconds before it names its
            # process is left to the storage's heartbeat (failed after its grace period), so wait for a named one.
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            proc.send_signal(signal.SIGSTOP)
            db = out / "search.db"
            if finished(db) >= 3 and finished(db, "RUNNING") == finished(db, "RUNNING", owned=True) >= 1:
                break
            proc.send_signal(signal.SIGCONT)
            time.sleep(0.2)
        else:
            pytest.fail("no trial finished within 90 s")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = complete_trials(out / "search.db")
    assert 3 <= len(before) < 40 and not (out / "report.json").exists()
    killed = trial_states(out / "search.db", "RUNNING")
    assert killed
    r = search(recipe, out, opts(strategy="optuna", trials=len(before) + 3), **QUIET)
    assert trial_states(out / "search.db", "RUNNING") == set()  # the killed trial was failed, not left running
    assert killed <= trial_states(out / "search.db", "FAIL")
    after = complete_trials(out / "search.db")
    assert all(after[n] == v for n, v in before.items())  # no finished trial lost or changed
    assert len(after) == len(before) + 3 and r.n_complete == len(after)
    assert r.report["search"]["n_trials_complete"] == len(after)
    assert len(r.front) >= 1 and all(p in r.points for p in r.front)


def test_unmeetable_budget_reports_the_best_found_and_exits_non_zero(tmp_path, capsys):
    # A frozen stage destroys the model whatever the search chooses.
    text = TINY.replace("SEARCH", "check: false").replace("EPOCHS", "1").replace(
        "stages:\n", "stages:\n  - {name: wreck, type: UnstructuredPruning, sparsity: 0.999, search: false, "
                     "check: false}\n")
    (tmp_path / "r.yaml").write_text(text)
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["search", "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o"),
                              "--max-accuracy-drop", "0.01"])
    assert args.func(args) == EXIT_BUDGET_MISSED
    assert "BUDGET MISSED" in capsys.readouterr().err
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["budget"]["feasible_found"] is False and rep["budget"]["met"] is False
    assert "no setting tried meets it" in (tmp_path / "o" / "report.md").read_text()


def test_bad_storage_and_contradictions_fail_before_work(tmp_path):
    # The recipe would train for an hour: every error below must come before that.
    slow = tiny(tmp_path).read_text().replace("epochs: 6,", "epochs: 5000,")
    (tmp_path / "slow.yaml").write_text(slow)
    recipe = tmp_path / "slow.yaml"
    t0 = time.time()
    with pytest.raises(StorageError, match="folder /nonexistent-dir does not exist"):
        search(recipe, tmp_path / "a", opts(storage="sqlite:////nonexistent-dir/x.db"), **QUIET)
    with pytest.raises(StorageError, match=r"postgresql\+pg8000://me:\*\*\*@127.0.0.1:1/db needs the Python driver "
                                           r"'pg8000'"):
        search(recipe, tmp_path / "b", opts(storage="postgresql+pg8000://me:secret@127.0.0.1:1/db"), **QUIET)
    with pytest.raises(StorageError, match=r"cannot reach storage postgresql\+psycopg://me:\*\*\*@127.0.0.1:1/db: .*"
                                           r"check host"):
        search(recipe, tmp_path / "b", opts(storage="postgresql+psycopg://me:secret@127.0.0.1:1/db"), **QUIET)
    with pytest.raises(StorageError, match="invalid storage URL"):
        open_storage("not a url")
    with pytest.raises(ConfigError, match="objective 'macs' cannot be reduced by the searchable stages"):
        search(recipe, tmp_path / "c", opts(objective="macs"), **QUIET)
    with pytest.raises(ConfigError, match="needs a budget"):
        search(load_recipe(recipe).replace(budget=BudgetSpec()), tmp_path / "d", opts(), **QUIET)
    with pytest.raises(ConfigError, match="fast strategy is a sequential bisection"):
        search(recipe, tmp_path / "e", opts(workers=2), **QUIET)
    with pytest.raises(ConfigError, match="objective must be one of"):
        search(recipe, tmp_path / "f", opts(objective="energy"), **QUIET)
    assert time.time() - t0 < 20
    frozen = tiny(tmp_path, search_line="search: false", name="frozen.yaml")
    with pytest.raises(ConfigError, match="nothing to search: no stage of .* has a searchable field"):
        search(frozen, tmp_path / "g", opts(), **QUIET)


def test_search_options_are_checked_when_made_and_filled_from_the_recipe(tmp_path):
    import dataclasses

    for field, bad, message in [("objective", "energy", "objective must be one of"),
                                ("strategy", "grid", "strategy must be one of"),
                                ("trials", 0, "trials must be a positive integer"),
                                ("workers", 1.5, "workers must be a positive integer"),
                                ("stop_after", -1, "stop_after must be a positive integer"),
                                ("max_accuracy_drop", 1.0, "max_accuracy_drop must satisfy"),
                                ("storage", "", "storage must be a non-empty string"),
                                ("progress", "yes", "progress must be True or False")]:
        with pytest.raises(ConfigError, match=message):
            SearchOptions(**{field: bad})
    with pytest.raises(ConfigError, match="fast strategy is a sequential bisection"):
        SearchOptions(strategy="fast", workers=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        SearchOptions().trials = 3
    o = SearchOptions(trials=5).resolve(load_recipe(tiny(tmp_path)), tmp_path / "o")
    assert (o.max_accuracy_drop, o.objective, o.strategy, o.trials, o.workers) == (0.03, "size", "fast", 5, 1)
    assert o.storage == f"sqlite:///{(tmp_path / 'o' / 'search.db').resolve()}" and o.study_name.endswith("-size")


def test_search_keywords_of_earlier_releases_still_work_with_a_warning(tmp_path):
    recipe = tiny(tmp_path)
    with pytest.warns(DeprecationWarning, match=r"SearchOptions\(objective=\.\.\., progress=\.\.\., stop_after"):
        with pytest.raises(ConfigError, match="objective 'macs' cannot be reduced"):  # mapped, then checked
            search(recipe, tmp_path / "a", objective="macs", progress=False, _stop_after=2, **QUIET)
    with pytest.raises(ConfigError, match="in SearchOptions only"):
        search(recipe, tmp_path / "b", opts(), trials=3, **QUIET)
    with pytest.raises(TypeError, match="unexpected keyword"):
        search(recipe, tmp_path / "c", trails=3, **QUIET)


def test_sensitivity_accepts_a_pruned_model_that_has_trained():
    from torchslim import UnstructuredPruning, prune
    from torchslim.data import digits

    data = digits(image_size=8)
    model = prune(LeNet300(in_features=64), UnstructuredPruning(0.5))
    model(torch.randn(2, 1, 8, 8)).sum().backward()  # leaves a non-leaf masked weight cached on the layers
    res = sensitivity(model, data, sparsities=(0.6,), bits=(4,), layers=["fc3"], progress=False)
    assert len(res.rows) == 2 and hasattr(model.fc1, "weight_mask")  # the user's model keeps its masks


def test_python_flow_with_your_own_model_and_data(tmp_path):
    """A trained model object, data and a budget, no recipe file: the recipe holds only the stages."""
    import torchslim
    from torchslim.data import digits
    from torchslim.pipeline.commands import run_recipe
    from torchslim.pipeline.recipe import RecipeError, parse_recipe

    torch.manual_seed(0)
    data = digits(image_size=8, val_fraction=0.25)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    torchslim.train(model, data.train, torchslim.TrainConfig(epochs=6, lr=3e-3, progress=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = torchslim.Recipe(stages=[("prune", UnstructuredPruning(0.5)),
                                      torchslim.Finetune(torchslim.TrainConfig(epochs=1, lr=1e-3, progress=False))])
    assert [s.name for s in recipe.stages] == ["prune", "finetune"]
    r = torchslim.search(recipe, tmp_path / "s", opts(max_accuracy_drop=0.03), model=model, data=data, **QUIET)
    assert r.report["model"] == "Sequential" and set(r.chosen["params"]) == {"prune.sparsity[1]", "prune.sparsity[3]"}
    assert r.report["budget"]["met_val"] and r.report["ratios"]["size"] > 1.2
    report = run_recipe(recipe, tmp_path / "c", model=model, data=data, log=lambda s: None)
    assert report["compressed"]["nonzero_params"] < report["baseline"]["nonzero_params"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the user's model is untouched
    # Without the model, the recipe says what it lacks (also from the command line).
    with pytest.raises(ConfigError, match="names no model: add a model: section"):
        torchslim.search(recipe, tmp_path / "x", opts(max_accuracy_drop=0.01), data=data, **QUIET)
    text = "stages:\n  - {name: prune, type: UnstructuredPruning, sparsity: 0.5}\n"
    assert parse_recipe(text, source="r.yaml").model is None
    with pytest.raises(RecipeError, match="missing required key 'stages'"):
        parse_recipe("model: {builtin: lenet5}\n", source="r.yaml")
