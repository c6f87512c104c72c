"""Attention-map distillation (MiniLM style) on tiny random ``transformers`` BERT encoders with padded batches."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import torchslim as ts  # noqa: E402
from torchslim.core.config import config_from_dict  # noqa: E402
from torchslim.core.errors import ConfigError, UnsupportedModelError  # noqa: E402
from torchslim.distillation.losses import attention_kl, head_mean  # noqa: E402
from torchslim.hf import drop_layers  # noqa: E402

ATTN = "encoder.layer.{}.attention.self"


def _bert(layers=4, heads=4, seed=0, hidden_dropout=0.1):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=layers, num_attention_heads=heads,
                                  intermediate_size=64, max_position_embeddings=32,
                                  hidden_dropout_prob=hidden_dropout,  # attention dropout stays at 0.1
                                  initializer_range=0.3)  # peaked attention: BERT's 0.02 makes maps near uniform
    return transformers.BertModel(cfg).eval()


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(0)
    out = []
    for n, length in ((4, 9), (3, 12), (5, 7)):
        ids = torch.randint(5, 40, (n, length), generator=g)
        mask = torch.ones(n, length, dtype=torch.long)
        for i in range(n):  # every batch has padded rows of different lengths
            mask[i, int(torch.randint(2, length + 1, (1,), generator=g)):] = 0
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def _attentions(model, batch):
    """Per-layer attention probabilities from transformers' own output_attentions, on eager attention."""
    model = copy.deepcopy(model).eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        return model(**batch, output_attentions=True).attentions


def _reference_kl(s, t, mask):
    """Plain loops: KL(teacher || student) of head-averaged maps over valid keys, averaged over valid queries."""
    s, t = s.mean(1), t.mean(1)
    total, count = 0.0, 0
    for n in range(len(mask)):
        valid = mask[n].nonzero().flatten()
        for q in valid:
            p, r = t[n, q, valid], s[n, q, valid]
            total += float((p * (p.log() - r.log())).sum())
            count += 1
    return total / count


def _gap(student, teacher, batches, pairs):
    """Mean reference KL over the batches for the (student layer, teacher layer) index pairs."""
    values = []
    for b in batches:
        s_att, t_att = _attentions(student, b), _attentions(teacher, b)
        values += [_reference_kl(s_att[i], t_att[j], b["attention_mask"]) for i, j in pairs]
    return sum(values) / len(values)


def test_attention_kl_matches_a_reference_and_heads_may_differ(batches):
    b = batches[0]
    teacher, student = _bert(heads=4), _bert(layers=2, heads=2, seed=1)
    t_att, s_att = _attentions(teacher, b), _attentions(student, b)
    assert s_att[0].shape[1] != t_att[0].shape[1]
    got = attention_kl(head_mean(s_att[0]), head_mean(t_att[1]), b["attention_mask"])
    assert got.item() == pytest.approx(_reference_kl(s_att[0], t_att[1], b["attention_mask"]), rel=1e-4)
    assert got.item() > 1e-3
    assert attention_kl(head_mean(t_att[1]), head_mean(t_att[1]), b["attention_mask"]).abs().item() < 1e-6


def test_identical_student_has_zero_attention_loss(batches):
    # Outputs match exactly without hidden dropout, so SGD moves the student only if the attention term is not
    # zero, e.g. if the student's attention dropout were left on.
    teacher = _bert(hidden_dropout=0.0)
    assert teacher.config._attn_implementation != "eager"
    config = ts.Distillation(mode="outputs", attention_layers={ATTN.format(i): ATTN.format(i) for i in range(4)},
                             attention_weight=1.0,
                             train=ts.TrainConfig(epochs=2, lr=0.05, optimizer="sgd", momentum=0.0, progress=False))
    out = ts.distill(copy.deepcopy(teacher), config, teacher=teacher, data=batches)
    for (name, p), q in zip(out.named_parameters(), teacher.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
    shuffled = copy.deepcopy(teacher)
    with torch.no_grad():
        shuffled.encoder.layer[0].attention.self.query.weight.mul_(3.0)
    moved = ts.distill(shuffled, config, teacher=teacher, data=batches)
    assert not torch.allclose(moved.encoder.layer[0].attention.self.query.weight,
                              shuffled.encoder.layer[0].attention.self.query.weight)


@pytest.mark.parametrize("cache", [False, True])
def test_layer_dropped_student_learns_the_teachers_attention(batches, cache):
    teacher = _bert()
    impl = teacher.config._attn_implementation
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    student = drop_layers(teacher, [0, 2])
    pairs = [(0, 1), (1, 3)]  # each kept layer learns the map of the layer after it
    gap0 = _gap(student, teacher, batches, pairs)
    config = ts.Distillation(mode="outputs", output_loss="cosine", attention_weight=1.0, cache_teacher=cache,
                             attention_layers={ATTN.format(i): ATTN.format(j) for i, j in pairs},
                             train=ts.TrainConfig(epochs=8, lr=3e-3, progress=False))
    out = ts.distill(student, config, teacher=teacher, data=batches)
    assert _gap(out, teacher, batches, pairs) < 0.7 * gap0
    assert teacher.config._attn_implementation == impl and out.config._attn_implementation == impl
    assert all(torch.equal(p, before[n]) for n, p in teacher.named_parameters())
    assert not teacher._forward_hooks and not any(m._forward_hooks or m._forward_pre_hooks for m in out.modules())


def test_distilbert_attention_modules(batches):
    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                        max_position_embeddings=32, initializer_range=0.3)
    teacher = transformers.DistilBertModel(cfg).eval()
    student = drop_layers(teacher, [0])
    gap0 = _gap(student, teacher, batches, [(0, 1)])
    config = ts.Distillation(mode="outputs", attention_layers={"transformer.layer.0.attention":
                                                               "transformer.layer.1.attention"},
                             train=ts.TrainConfig(epochs=8, lr=3e-3, progress=False))
    out = ts.distill(student, config, teacher=teacher, data=batches)
    assert _gap(out, teacher, batches, [(0, 1)]) < 0.7 * gap0


def test_bad_attention_layers_are_refused_before_training(batches):
    teacher = _bert(layers=2)
    impl = teacher.config._attn_implementation
    fast = ts.TrainConfig(max_steps=1, progress=False)
    with pytest.raises(ConfigError, match=r"attention_layers: the student has no layer 'encoder.layer.0.atention"
                                          r".self' \(did you mean 'encoder.layer.0.attention.self'"):
        ts.distill(copy.deepcopy(teacher), ts.Distillation(
            mode="outputs", attention_layers={"encoder.layer.0.atention.self": ATTN.format(0)}, train=fast),
            teacher=teacher, data=batches)
    with pytest.raises(ConfigError, match=r"the teacher has no layer 'encoder.layer.5.attention.self'"):
        ts.distill(copy.deepcopy(teacher), ts.Distillation(
            mode="outputs", attention_layers={ATTN.format(0): ATTN.format(5)}, train=fast),
            teacher=teacher, data=batches)
    with pytest.raises(UnsupportedModelError, match=r"'encoder.layer.1.intermediate' gives no attention "
                                                    r"probabilities.*attention.self"):
        ts.distill(copy.deepcopy(teacher), ts.Distillation(
            mode="outputs", attention_layers={ATTN.format(0): "encoder.layer.1.intermediate"}, train=fast),
            teacher=teacher, data=batches)
    sdpa_only = copy.deepcopy(teacher)
    sdpa_only.set_attn_implementation = lambda impl: None  # as a model that cannot switch to eager attention
    with pytest.raises(UnsupportedModelError, match=r"teacher's module 'encoder.layer.1.attention.self' gives no "
                                                    r"attention probabilities.*attn_implementation='eager'"):
        ts.distill(copy.deepcopy(teacher), ts.Distillation(
            mode="outputs", attention_layers={ATTN.format(0): ATTN.format(1)}, train=fast),
            teacher=sdpa_only, data=batches)
    assert teacher.config._attn_implementation == impl and not teacher._forward_hooks
    for bad in (dict(attention_layers={}), dict(attention_layers={"a": 1}), dict(attention_weight=-1.0),
                dict(attention_layers=["a"])):
        with pytest.raises(ConfigError, match="attention_"):
            ts.Distillation(**bad)


def test_attention_fields_round_trip_through_a_recipe():
    config = ts.Distillation(mode="outputs", attention_layers={ATTN.format(0): ATTN.format(1)}, attention_weight=0.3)
    assert config_from_dict(config.to_dict()) == config
    assert config_from_dict(config.to_dict(compact=True)) == config
