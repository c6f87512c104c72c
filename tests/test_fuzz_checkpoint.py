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


try:
    import hypothesis
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis comes with torchslim[test]
    hypothesis = None

if hypothesis is not None:
    # JSON values an attacker may write into a manifest entry: huge and negative integers, odd floats, strings,
    # nested lists and mappings.
    _json = st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                  st.text(max_size=8)),
        lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
        max_leaves=8)

    @pytest.fixture(scope="module")
    def corpus(fuzz, tmp_path_factory):
        folder = tmp_path_factory.mktemp("corpus")
        files = fuzz.build_corpus(folder, int8=False)
        refs = {n: fuzz.fingerprint(fuzz.load(p), x) for n, (p, x) in files.items()}
        return folder, files, refs

    @hypothesis.settings(max_examples=80, deadline=None, derandomize=True,
                         suppress_health_check=[hypothesis.HealthCheck.too_slow])
    @hypothesis.given(data=st.data())
    def test_generated_mutations_end_in_checkpoint_error_or_an_identical_model(fuzz, corpus, data):
        folder, files, refs = corpus
        name = data.draw(st.sampled_from(sorted(files)), label="file")
        path, x = files[name]
        blob = path.read_bytes()
        kind = data.draw(st.sampled_from(["flip", "truncate", "append", "entry", "shape"]), label="kind")
        if kind == "flip":
            out = bytearray(blob)
            for i in data.draw(st.lists(st.integers(0, len(blob) - 1), min_size=1, max_size=8), label="at"):
                out[i] ^= 1 << data.draw(st.integers(0, 7))
            blob = bytes(out)
        elif kind == "truncate":
            blob = blob[: data.draw(st.integers(0, len(blob) - 1), label="keep")]
        elif kind == "append":
            blob += data.draw(st.binary(min_size=1, max_size=64), label="tail")
        else:  # a manifest edit with the sha256 recomputed, as an attacker would write it
            manifest, stored = fuzz._split(blob)
            entry = manifest["tensors"][data.draw(st.sampled_from(sorted(manifest["tensors"])), label="tensor")]
            if kind == "shape":
                entry["shape"] = data.draw(st.lists(st.integers(-2, 2**40), max_size=4), label="shape")
            else:
                key = data.draw(st.sampled_from(sorted(entry)), label="key")
                entry[key] = data.draw(_json, label="value")
            blob = fuzz._join(manifest, stored)
        case = folder / "case.slim"
        case.write_bytes(blob)
        result = fuzz.run_case(case, refs[name], x, folder / "CODE_RAN")
        assert result["outcome"] in ("checkpoint_error", "identical"), result
