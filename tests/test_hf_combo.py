"""The combined pipeline of the pruned + distilled + int8 MiniLM row on a tiny random BERT: layers dropped, heads
and FFN neurons pruned (Taylor), distilled from the original on mean-pooled embeddings, exported to ONNX with
ONNX Runtime's fusions and dynamic int8 (embeddings included)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import torchslim as ts  # noqa: E402
from torchslim import hf  # noqa: E402
from torchslim.hf.metrics import embed  # noqa: E402
from torchslim.hf.serve import OrtModel, export_transformer, fuse, quantize_int8  # noqa: E402

WORDS = ("the a man woman dog cat is are plays runs eats on in with guitar park ball food red big small quickly "
         "stage people listen child horse rides snake mouse").split()


def _tokenizer():
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)})


def _sentences(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(k),), generator=g))
            for k in torch.randint(2, 14, (n,), generator=g)]


def _batches(tok, sizes: tuple[int, ...], seed: int) -> list[dict]:
    """Dynamically padded dict batches: each batch has its own (batch, sequence) shape."""
    texts = _sentences(sum(sizes), seed)
    out, start = [], 0
    for n in sizes:
        out.append(dict(tok(texts[start:start + n], padding=True, return_tensors="pt")))
        start += n
    return out


def _cos(a: torch.nn.Module, b: torch.nn.Module, batches: list[dict]) -> float:
    return float(torch.cat([(embed(a, x) * embed(b, x)).sum(-1) for x in batches]).mean())


def _mse(a: torch.nn.Module, b: torch.nn.Module, batches: list[dict]) -> float:
    """Mean squared distance of the mean-pooled (unnormalised) sentence embeddings."""
    return float(torch.cat([(embed(a, x, normalize=False) - embed(b, x, normalize=False)).pow(2).sum(-1)
                            for x in batches]).mean())


def _embedding_energy(outputs, batch) -> torch.Tensor:
    return F.normalize(hf.mean_pool(outputs.last_hidden_state, batch["attention_mask"]), dim=-1).sum(-1).pow(2).mean()


def _teacher(tok) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, initializer_range=0.2)
    return transformers.BertModel(config).eval()


def test_prune_distill_int8_export_keeps_shapes_and_dynamic_axes(tmp_path):
    tok = _tokenizer()
    teacher = _teacher(tok)
    train, val = _batches(tok, (16,) * 6, seed=1), _batches(tok, (3, 7), seed=2)

    student = hf.drop_layers(teacher, keep=[0, 2])
    student = ts.prune(student, ts.StructuredPruning(0.5, importance="taylor", importance_batches=4),
                       data=train, loss_fn=_embedding_energy, example_inputs=val[0])
    assert hf.layer_shapes(student) == [(2, 2, 32)] * 2 and len(teacher.encoder.layer) == 3
    before = _mse(teacher, student, val)

    kd = ts.Distillation(mode="outputs", output_loss="mse", pooling="mean",
                         train=ts.TrainConfig(epochs=8, lr=1e-3, optimizer="adamw", progress=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = ts.distill(student, kd, teacher=teacher, data=train).eval()
    after = _mse(teacher, student, val)
    assert after < 0.7 * before, (before, after)  # held-out sentences: the student moved towards the teacher

    fp32 = export_transformer(student, val[0], tmp_path / "student.onnx")
    assert fuse(fp32, tmp_path / "fused.onnx", student)
    fused = OrtModel(tmp_path / "fused.onnx")  # fused attention with the pruned head count, not the config's
    assert "Attention" in {n.op_type for n in onnx.load(str(tmp_path / "fused.onnx")).graph.node}
    for batch in val:
        assert torch.allclose(fused(**batch), student(**batch).last_hidden_state, atol=1e-4)
    quantize_int8(tmp_path / "fused.onnx", tmp_path / "int8.onnx")
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert "QAttention" in ops  # fused attention survives the pruned head count
    assert "QEmbedLayerNormalization" in ops  # the embedding tables are int8 too
    for value in [*graph.input, *graph.output]:
        dims = [d.dim_param for d in value.type.tensor_type.shape.dim[:2]]
        assert dims == ["batch", "sequence"], (value.name, dims)

    served = OrtModel(tmp_path / "int8.onnx")
    for batch in val:  # (3, L1) and (7, L2), neither the export's shape
        out = served(**batch)
        ref = student(**batch).last_hidden_state
        assert out.shape == ref.shape == (*batch["input_ids"].shape, 32)
    assert _cos(student, served, val) > 0.98


def _similarity_gap(a: torch.nn.Module, b: torch.nn.Module, batches: list[dict]) -> float:
    """Mean absolute difference of the two models' pairwise cosine similarities within each batch."""
    gaps = []
    for x in batches:
        ea, eb = embed(a, x), embed(b, x)
        gaps.append((ea @ ea.T - eb @ eb.T).abs().mean())
    return float(torch.stack(gaps).mean())


def test_hidden_pruned_student_distils_by_similarity_and_serves_int8(tmp_path):
    """Half the hidden size removed (heads kept, so fused attention reads 16 channels and computes 32): the
    narrower student learns the teacher's sentence similarities and exports, fuses and quantizes as before."""
    tok = _tokenizer()
    teacher = _teacher(tok)
    train, val = _batches(tok, (16,) * 6, seed=1), _batches(tok, (5, 7), seed=2)
    student = ts.prune(teacher, ts.StructuredPruning(0.0, hidden_ratio=0.5, importance="taylor", importance_batches=4),
                       data=train, loss_fn=_embedding_energy, example_inputs=val[0])
    assert student.config.hidden_size == 16 and student.embeddings.word_embeddings.weight.shape[1] == 16
    before = _similarity_gap(teacher, student, val)
    kd = ts.Distillation(mode="outputs", output_loss="similarity", pooling="mean",
                         train=ts.TrainConfig(epochs=8, lr=1e-3, optimizer="adamw", progress=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = ts.distill(student, kd, teacher=teacher, data=train).eval()
    after = _similarity_gap(teacher, student, val)
    assert after < 0.7 * before, (before, after)

    fp32 = export_transformer(student, val[0], tmp_path / "student.onnx")
    assert fuse(fp32, tmp_path / "fused.onnx", student)
    assert "Attention" in {n.op_type for n in onnx.load(str(tmp_path / "fused.onnx")).graph.node}
    fused = OrtModel(tmp_path / "fused.onnx")
    for batch in val:
        assert torch.allclose(fused(**batch), student(**batch).last_hidden_state, atol=1e-4)
    quantize_int8(tmp_path / "fused.onnx", tmp_path / "int8.onnx")
    served = OrtModel(tmp_path / "int8.onnx")
    for batch in val:
        assert served(**batch).shape == (*batch["input_ids"].shape, 16)
    assert _cos(student, served, val) > 0.98
