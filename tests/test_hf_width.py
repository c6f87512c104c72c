"""torchslim.hf.width: hidden-size pruning of transformers models (tiny random configs): every module on the
residual stream sliced alike, heads found by data flow, ties kept, configs and checkpoints round-tripping."""

from __future__ import annotations

import pytest
import torch

import torchslim
from torchslim import hf
from torchslim.core.errors import CheckpointError, ConfigError
from torchslim.hf.arch import HIDDEN_FIELD, hidden_size
from torchslim.hf.width import stream_readers

from test_hf_structure import MODELS, _inputs, _model, _out

transformers = pytest.importorskip("transformers")

HEADS = {  # task heads on top of the base models, and the Linear modules that read the residual stream
    "bert_classifier": (lambda: transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
        num_labels=3)), ["bert.pooler.dense"]),
    "distilbert_classifier": (lambda: transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
        vocab_size=97, dim=32, n_layers=2, n_heads=4, hidden_dim=40, num_labels=3)), ["pre_classifier"]),
}
READERS = {"bert": ["pooler.dense"], "roberta": ["pooler.dense"], "distilbert": [], "vit": ["classifier"],
           "gpt2": ["lm_head"], "llama": ["lm_head"]}


def _build(name: str):
    torch.manual_seed(0)
    return (HEADS[name][0]() if name in HEADS else MODELS[name]()).eval()


def _x(name: str) -> dict:
    return _inputs("vit" if name == "vit" else "bert")


@pytest.mark.parametrize("name", list(MODELS) + list(HEADS))
def test_hidden_pruning_round_trips_through_checkpoints_and_folders(name, tmp_path):
    model = _build(name)
    x = _x(name)
    want_readers = HEADS[name][1] if name in HEADS else READERS[name]
    assert stream_readers(model, x) == want_readers
    before = _out(model, x)
    summary = hf.prune_structure(model, heads=0.5, ffn=0.25, hidden=0.25, example_inputs=x)
    assert summary["hidden"] == [32, 24] and len(summary["kept_hidden"]) == 24
    assert hidden_size(model) == 24 == model.config.hidden_size
    # nothing is 32 wide any more but a pooler's outputs and what reads them (the classifier on top)
    wide = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if 32 in p.shape}
    assert wide == ({"classifier", *want_readers} if name in HEADS else {r for r in want_readers if "pooler" in r})
    got = _out(model, x)
    assert got.shape[:-1] == before.shape[:-1]
    path = torchslim.save(model, tmp_path / "m.slim", example_inputs=x)
    assert torch.equal(_out(torchslim.load(path).eval(), x), got)
    model.save_pretrained(tmp_path / "hf")
    assert torch.equal(_out(hf.from_pretrained(tmp_path / "hf").eval(), x), got)
    if hf.arch_of(model).head_dim_field:  # the config's own fields say it all: plain transformers loads it
        assert getattr(model.config, HIDDEN_FIELD, None) is None
        plain = type(model).from_pretrained(tmp_path / "hf").eval()
        assert torch.equal(_out(plain, x), got)
    else:  # the head size follows from hidden_size: plain transformers builds the wrong layers and says so
        assert getattr(model.config, HIDDEN_FIELD) == {"base": 32, "readers": want_readers}
        with pytest.raises((RuntimeError, ValueError), match="size|multiple"):
            type(model).from_pretrained(tmp_path / "hf")


def test_tied_language_model_head_stays_tied():
    model = _build("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    hf.prune_structure(model, hidden=0.5, example_inputs=_x("gpt2"))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert tuple(model.lm_head.weight.shape) == (97, 16) and model.transformer.embed_dim == 16


@pytest.mark.parametrize("importance", ["l1", "taylor"])
def test_weak_channels_leave_and_the_rest_stays_close(importance):
    """Residual channels made weak everywhere they are written and read are the ones removed, and the pruned
    model's output stays close to the original's on the kept channels (LayerNorm now averages over fewer)."""
    model = _build("bert")
    weak = torch.tensor([3, 10, 17, 29])
    with torch.no_grad():
        model.embeddings.word_embeddings.weight[:, weak] *= 1e-3
        model.embeddings.position_embeddings.weight[:, weak] *= 1e-3
        model.embeddings.token_type_embeddings.weight[:, weak] *= 1e-3
        for norm in [model.embeddings.LayerNorm] + [m for n, m in model.named_modules() if n.endswith("LayerNorm")]:
            norm.weight[weak] *= 1e-3
            norm.bias[weak] *= 1e-3
    x = _x("bert")
    before = _out(model, x)
    batches = [_inputs("bert", seed=s) for s in range(3)]
    summary = hf.prune_structure(model, hidden=0.125, importance=importance, data=batches,
                                 loss_fn=lambda out, batch: out.last_hidden_state.pow(2).mean(), example_inputs=x)
    kept = torch.tensor(summary["kept_hidden"])
    assert not set(weak.tolist()) & set(kept.tolist())
    after = _out(model, x)
    cos = torch.nn.functional.cosine_similarity(after, before[..., kept], dim=-1)
    assert cos.min() > 0.99


def test_structured_pruning_config_and_round_to():
    model = _build("llama")
    pruned = torchslim.prune(model, torchslim.StructuredPruning(ratio=0.0, hidden_ratio=0.3, round_to=8),
                             example_inputs=_x("llama"))
    assert hidden_size(pruned) == 24 and hidden_size(model) == 32  # 32 - 9 = 23, rounded up to 24; a copy
    assert pruned.config.head_dim == 8 and pruned.config.hidden_size == 24


def test_bad_input_is_refused():
    with pytest.raises(ConfigError, match="hidden_ratio"):
        torchslim.StructuredPruning(hidden_ratio=1.0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="transformers"):
        torchslim.prune(net, torchslim.StructuredPruning(hidden_ratio=0.5), example_inputs=torch.randn(1, 4))
    vit = _build("vit")  # its dummy inputs are token ids, not images: the readers cannot be found without a batch
    with pytest.raises(ConfigError, match="example_inputs"):
        hf.prune_structure(vit, hidden=0.5)
    with pytest.raises(ConfigError, match="hidden"):
        hf.prune_structure(_build("bert"), hidden=1.5)
    config = _build("bert").config.to_dict()
    config.update(hidden_size=24, **{HIDDEN_FIELD: {"base": 32, "readers": ["os.system"]}})
    with pytest.raises(CheckpointError, match="readers"):
        hf.build_model("BertModel", config)
    config[HIDDEN_FIELD] = {"base": 16, "readers": []}
    with pytest.raises(CheckpointError, match="base width"):
        hf.build_model("BertModel", config)
