"""A seeded mutation corpus over every checkpoint encoding and file kind: each mutated file loads back
identical or raises CheckpointError (benchmarks/fuzz_checkpoints.py runs the same cases at scale)."""

import importlib.util
import random
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("constriction")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fuzz():
    spec = importlib.util.spec_from_file_location("fuzz_checkpoints_bench", ROOT / "benchmarks" / "fuzz_checkpoints.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_mutations_end_in_checkpoint_error_or_an_identical_model(fuzz, tmp_path):
    result = fuzz.fuzz(300, seed=1, folder=tmp_path, log=lambda s: None)
    assert set(result["files"]) >= {"dense", "pruned_bitmask", "pruned_relative", "shared_huffman", "shared_ans",
                                    "qat4", "ternary", "int8_dynamic", "int8_static"}
    assert set(result["outcomes"]) <= {"checkpoint_error", "identical"}, result["examples"]
    assert result["outcomes"]["checkpoint_error"] > 200 and result["outcomes"].get("identical", 0) > 0


def test_foreign_callables_never_run(fuzz, tmp_path):
    corpus = fuzz.build_corpus(tmp_path, int8=False)
    path, x = corpus["dense"]
    ref = fuzz.fingerprint(fuzz.load(path), x)
    marker = tmp_path / "CODE_RAN"
    manifest, stored = fuzz._split(path.read_bytes())
    for name, arg in fuzz._FOREIGN:
        manifest["arch"] = {"factory": name, "kwargs": {arg: f"touch {marker}"}}
        case = tmp_path / "case.slim"
        case.write_bytes(fuzz._join(manifest, stored))
        result = fuzz.run_case(case, ref, x, marker)
        assert result["outcome"] == "checkpoint_error", (name, result)
        assert "refusing to call" in result["detail"] and "trusted=" in result["detail"]
        assert not marker.exists()


def test_every_manifest_edit_kind_is_exercised(fuzz, tmp_path):
    corpus = fuzz.build_corpus(tmp_path, int8=False)
    rng = random.Random(3)
    kinds = {fuzz.mutate(corpus[n][0].read_bytes(), rng, str(tmp_path / "m"))[0]
             for n in sorted(corpus) for _ in range(12)}
    assert {e.__name__ for e in fuzz.MANIFEST_EDITS} <= kinds | {"flip", "truncate", "append"}


def test_an_int8_graph_whose_tensors_fit_the_file_but_not_the_graph_is_refused_at_load(fuzz, tmp_path):
    # A 1-bit packed tensor re-declared as trits decodes to other values of the same count: the file is
    # consistent, but ONNX Runtime's kernels would fail at the first forward (found by the 10,000-case campaign).
    corpus = fuzz.build_corpus(tmp_path, int8=True)
    path, x = corpus["int8_static"]
    manifest, stored = fuzz._split(path.read_bytes())
    packed = [e for e in manifest["tensors"].values() if e.get("width") == 1]
    assert packed
    for entry in packed:
        entry["width"] = "trit"
    case = tmp_path / "case.slim"
    case.write_bytes(fuzz._join(manifest, stored))
    result = fuzz.run_case(case, fuzz.fingerprint(fuzz.load(path), x), x, tmp_path / "CODE_RAN")
    assert result["outcome"] == "checkpoint_error", result
    assert "does not run with its stored tensors" in result["detail"]
