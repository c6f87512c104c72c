"""One-shot OBS (SparseGPT) and magnitude pruning, unstructured and 2:4, on tiny random ``transformers`` encoders
fed padded dict batches: padding tokens stay out of the layer Hessians, tied output embeddings stay dense."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import torchslim as ts  # noqa: E402
from torchslim.data.calibration import calibration_runner  # noqa: E402
from torchslim.hf.metrics import embed  # noqa: E402
from torchslim.nn.hessian import layer_hessian  # noqa: E402
from torchslim.pruning.nm import is_nm  # noqa: E402

WORDS = "the a man woman dog cat is plays runs on in with guitar park ball red big small stage people".split()


@pytest.fixture(scope="module")
def tok():
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)})


def _config(vocab: int) -> "transformers.BertConfig":
    return transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=64)


def _sentences(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(k),), generator=g))
            for k in torch.randint(2, 12, (n,), generator=g)]


def _batches(tok, pad_to: int | None = None) -> list[dict]:
    """Four batches of 8 sentences, padded to their longest (``pad_to`` None) or to ``pad_to`` tokens."""
    padding = {"padding": "max_length", "max_length": pad_to} if pad_to else {"padding": True}
    return [dict(tok(_sentences(8, seed), return_tensors="pt", **padding)) for seed in range(4)]


def _bert(tok, cls=None):
    torch.manual_seed(0)
    return (cls or transformers.BertModel)(_config(len(tok))).eval()


def test_layer_hessian_leaves_padding_tokens_out(tok):
    model = _bert(tok)
    batches = _batches(tok, pad_to=40)
    layer = model.encoder.layer[1].intermediate.dense
    run = calibration_runner(model, batches, len(batches), "test")
    H, seen = layer_hessian(layer, run, len(batches))
    rows = []
    handle = layer.register_forward_pre_hook(lambda m, inp: rows.append(inp[0]))
    with torch.no_grad():
        for b in batches:
            model(**b)
    handle.remove()
    real = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(rows, batches)]).double()
    assert seen == sum(int(b["attention_mask"].sum()) for b in batches) < sum(b["input_ids"].numel() for b in batches)
    torch.testing.assert_close(H, 2 * real.t() @ real / real.shape[0])


@pytest.mark.parametrize("config", [ts.UnstructuredPruning(0.5, scope="layer", method="obs", calibration_batches=4),
                                    ts.SemiStructuredPruning(method="obs", calibration_batches=4)],
                         ids=["unstructured", "2:4"])
def test_obs_on_a_transformer_ignores_how_far_batches_are_padded(tok, config):
    model = _bert(tok)
    short = ts.prune(model, config, data=_batches(tok))
    long = ts.prune(model, config, data=_batches(tok, pad_to=48))
    for (name, a), b in zip(short.named_modules(), long.modules()):
        if hasattr(a, "weight_mask"):
            assert torch.equal(a.weight_mask, b.weight_mask), name
            torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-5)


def test_obs_keeps_embeddings_closer_than_magnitude(tok):
    """Layer-wise reconstruction: at 50% (and 2:4) OBS's pooled embeddings stay closer to the dense model's."""
    model = _bert(tok)
    data, held = _batches(tok), dict(tok(_sentences(16, 99), padding=True, return_tensors="pt"))
    ref = embed(model, held)

    def cos(config):
        out = ts.prune(model, config, data=data)
        return torch.nn.functional.cosine_similarity(ref, embed(out, held)).mean().item()

    for make in (lambda method: ts.UnstructuredPruning(0.5, scope="layer", method=method, calibration_batches=4),
                 lambda method: ts.SemiStructuredPruning(method=method, calibration_batches=4)):
        assert cos(make("obs")) > cos(make("magnitude"))


@pytest.mark.parametrize("method", ["magnitude", "obs"])
@pytest.mark.parametrize("kind", ["unstructured", "2:4"])
def test_tied_output_embedding_stays_dense_with_a_warning(tok, method, kind):
    model = _bert(tok, transformers.BertForMaskedLM)
    decoder, words = model.cls.predictions.decoder, model.bert.embeddings.word_embeddings
    assert decoder.weight is words.weight  # tied, as the checkpoint's config asks
    before = words.weight.detach().clone()
    config = ts.UnstructuredPruning(0.5, scope="layer", method=method, calibration_batches=4) \
        if kind == "unstructured" else ts.SemiStructuredPruning(method=method, calibration_batches=4)
    with pytest.warns(RuntimeWarning, match=r"cls\.predictions\.decoder.*tied to 'bert\.embeddings\.word_embeddings"):
        out = ts.prune(copy.deepcopy(model), config, data=_batches(tok))
    assert torch.equal(out.bert.embeddings.word_embeddings.weight, before)
    assert torch.equal(out.cls.predictions.decoder.weight, before)
    assert not hasattr(out.cls.predictions.decoder, "weight_mask")
    dense = out.bert.encoder.layer[0].intermediate.dense
    assert hasattr(dense, "weight_mask")
    if kind == "2:4":
        assert is_nm(dense.weight, 2, 4)
    else:
        assert float((dense.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    # Excluding it by name is the way to say so: no warning then.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ts.prune(copy.deepcopy(model), config.replace(exclude=("cls.predictions.decoder",)), data=_batches(tok))
