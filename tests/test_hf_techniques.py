"""Quantization, distillation, low rank, text data, the STS metric and ONNX serving on tiny random
``transformers`` encoders with dynamically padded dict batches from their tokenizer."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import torchslim as ts  # noqa: E402
from torchslim.core.errors import ConfigError, DataError  # noqa: E402
from torchslim.hf.data import read_columns, stsb, stsb_sentences, text_loader  # noqa: E402
from torchslim.data.batches import output_tensor  # noqa: E402
from torchslim.hf.metrics import embed, mean_pool, rank, spearman, spearman_metric  # noqa: E402

WORDS = ("the a man woman dog cat is are plays runs eats on in with guitar park ball food red big small quickly "
         "stage people listen child horse rides snake mouse").split()


def _vocab(tmp_path, n_extra=0):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *(f"extra{i}" for i in range(n_extra))]
    return transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)})


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return _vocab(tmp_path_factory.mktemp("tok"))


def _bert(vocab, kind="bert", positions=64):
    torch.manual_seed(0)
    if kind == "distilbert":
        cfg = transformers.DistilBertConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                            max_position_embeddings=positions)
        return transformers.DistilBertModel(cfg).eval()
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=positions)
    return transformers.BertModel(cfg).eval()


def _sentences(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(k),), generator=g))
            for k in torch.randint(2, 12, (n,), generator=g)]


@pytest.fixture(scope="module")
def sts_dir(tmp_path_factory):
    """An STS-B-shaped folder: tab-separated, no header, an unbalanced quote, an extra trailing column."""
    d = tmp_path_factory.mktemp("stsb")
    a, b = _sentences(48, 1), _sentences(48, 2)
    g = torch.Generator().manual_seed(3)
    for split in ("train", "dev"):
        lines = [f"main-news\tsrc\t2012\t{i:04d}\t{float(torch.rand(1, generator=g)) * 5:.3f}\t{x}\t{y}"
                 + ("\textra\tcolumns" if i % 7 == 0 else "") for i, (x, y) in enumerate(zip(a, b))]
        lines[0] = lines[0].replace(a[0], 'a "quoted man', 1)
        (d / f"sts-{split}.csv").write_text("\n".join(lines) + "\n")
    return d


def _features(model, loader):
    return [embed(model, a) for a, _, _ in loader]


def test_text_loader_dict_batches_dynamic_padding(tmp_path, tok):
    path = tmp_path / "data.csv"
    texts = _sentences(10)
    path.write_text("text,label\n" + "\n".join(f"{t},{i % 2}" for i, t in enumerate(texts)) + "\n")
    batches = list(text_loader(tok, path, ["text"], label="label", batch_size=4))
    assert [len(b["labels"]) for b in batches] == [4, 4, 2]
    assert batches[0]["labels"].tolist() == [0.0, 1.0, 0.0, 1.0]
    for b, chunk in zip(batches, (texts[:4], texts[4:8], texts[8:])):
        longest = max(len(tok(t)["input_ids"]) for t in chunk)
        assert b["input_ids"].shape[1] == longest  # padded per batch, not to max_length
        assert b["attention_mask"].sum(1).tolist() == [len(tok(t)["input_ids"]) for t in chunk]


def test_stsb_loader_reads_unquoted_tsv(sts_dir, tok):
    pairs = list(stsb(tok, sts_dir, "dev", batch_size=16))
    a, b, y = pairs[0]
    assert len(y) == 16 and set(a) >= {"input_ids", "attention_mask"}
    rows = read_columns(sts_dir / "sts-dev.csv", (5, 6), label=4, delimiter="\t", header=False)
    assert rows[0][0][0].startswith('a "quoted man') and len(rows) == 48  # no CSV quoting across lines
    assert sum(len(p[2]) for p in pairs) == 48
    sentences = list(stsb_sentences(tok, sts_dir, "train", batch_size=32))
    train = read_columns(sts_dir / "sts-train.csv", (5, 6), delimiter="\t", header=False)
    distinct = {s for texts, _ in train for s in texts}
    assert sum(len(s["input_ids"]) for s in sentences) == len(distinct) > 48  # both columns, no duplicates


def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 6, (200,), generator=g).float()  # many ties
    y = x + torch.randn(200, generator=g)
    assert torch.allclose(rank(x), torch.tensor(stats.rankdata(x.numpy())))
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x.numpy(), y.numpy()).statistic, abs=1e-12)


def test_spearman_metric_matches_scipy_on_pooled_embeddings(sts_dir, tok):
    stats = pytest.importorskip("scipy.stats")
    model = _bert(len(tok))
    loader = stsb(tok, sts_dir, "dev", batch_size=16)
    sims, gold = [], []
    for a, b, y in loader:
        ea = model(**a).last_hidden_state
        eb = model(**b).last_hidden_state
        pa = (ea * a["attention_mask"][..., None]).sum(1) / a["attention_mask"].sum(1, keepdim=True)
        pb = (eb * b["attention_mask"][..., None]).sum(1) / b["attention_mask"].sum(1, keepdim=True)
        sims.append(F.cosine_similarity(pa, pb).detach())
        gold.append(y)
    expected = 100 * stats.spearmanr(torch.cat(sims).numpy(), torch.cat(gold).numpy()).statistic
    assert spearman_metric(model, loader) == pytest.approx(expected, abs=1e-6)
    h = torch.randn(2, 3, 4)
    assert torch.allclose(mean_pool(h, torch.tensor([[1, 1, 0], [1, 0, 0]])),
                          torch.stack([h[0, :2].mean(0), h[1, 0]]))


def _cos_to(reference, quantized, batches):
    return min(F.cosine_similarity(embed(reference, b), embed(quantized, b)).min().item() for b in batches)


@pytest.fixture(scope="module")
def batches(tok):
    # different batch sizes and sequence lengths
    return [dict(tok(_sentences(n, seed=n), padding=True, return_tensors="pt")) for n in (3, 5, 8, 2)]


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_dynamic_weight_only_svd_on_dict_batches(kind, tok, batches):
    model = _bert(len(tok), kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dyn = ts.quantize(model, ts.DynamicQuantization(), example_inputs=batches[0])
        w4 = ts.quantize(model, ts.WeightOnly(4, group_size=16), example_inputs=batches[0])
    svd = ts.decompose(model, ts.SVD(energy=0.99), example_inputs=batches[0])
    linears = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    for compressed in (dyn, w4):
        assert not any(type(compressed.get_submodule(n)) is torch.nn.Linear for n in linears)
    for compressed, floor in ((dyn, 0.99), (w4, 0.95), (svd, 0.98)):
        assert _cos_to(model, compressed, batches) > floor


def test_static_int8_on_dynamically_padded_batches(tok, batches):
    """Static int8 of a transformer: calibrated on batches of several lengths, it runs any batch size and
    sequence length, and the additive attention mask (about -3.4e38 where padded) stays float."""
    pytest.importorskip("onnxruntime")
    model = _bert(len(tok))
    with torch.no_grad():  # peaked attention, so that a quantized mask (all scores -> one value) shows
        for layer in model.encoder.layer:
            layer.attention.self.query.weight.mul_(8)
    with pytest.warns(UserWarning, match="calibrated beyond"):
        q = ts.quantize(model, ts.StaticQuantization(calibration_batches=4), data=batches[:3])
    assert q.info["float_for_huge_range"]  # the mask's Add nodes
    longer = dict(tok([" ".join(WORDS[:20])] * 7, return_tensors="pt"))  # a length and size not calibrated
    assert output_tensor(q(**longer)).shape == (7, longer["input_ids"].shape[1], 32)
    assert _cos_to(model, q, [*batches, longer]) > 0.99


def test_qat_with_a_cosine_loss_to_the_teachers_embeddings(tok, batches):
    teacher = _bert(len(tok))
    target = {len(b["input_ids"]): embed(teacher, b) for b in batches}  # batch sizes differ

    def cosine_to_teacher(outputs, batch):
        pooled = mean_pool(outputs.last_hidden_state, batch["attention_mask"])
        return (1 - F.cosine_similarity(pooled, target[len(batch["input_ids"])])).mean()

    config = ts.QAT(8, train=ts.TrainConfig(epochs=2, lr=1e-4, progress=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = ts.quantize(teacher, config, data=batches, example_inputs=batches[0], loss_fn=cosine_to_teacher)
    assert _cos_to(teacher, qat, batches) > 0.97
    assert teacher.training is False and all(p.requires_grad for p in teacher.parameters())


def test_distill_embeddings_without_labels_and_hidden_states(tok, batches):
    teacher = _bert(len(tok))
    torch.manual_seed(1)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    before = _cos_to(teacher, student, batches)
    config = ts.Distillation(mode="outputs", output_loss="cosine", pooling="mean",
                             feature_layers={"encoder.layer.0": "encoder.layer.0"},
                             train=ts.TrainConfig(epochs=6, lr=1e-3, progress=False))
    out = ts.distill(student, config, teacher=teacher, data=batches)
    assert _cos_to(teacher, out, batches) > before


def test_onnx_export_two_shapes_and_int8(tmp_path, tok, batches):
    pytest.importorskip("onnxruntime")
    from torchslim.hf.serve import OrtModel, compile_cpu, export_transformer, fuse, quantize_int8

    model = _bert(len(tok))
    path = export_transformer(model, batches[0], tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="overwrite"):
        export_transformer(model, batches[0], path)
    served = OrtModel(path)
    for b in (batches[1], batches[2]):  # (5, L1) and (8, L2)
        assert torch.allclose(served(**b), model(**b).last_hidden_state, atol=1e-4)
    assert fuse(path, tmp_path / "fused.onnx", model)
    quantize_int8(tmp_path / "fused.onnx", tmp_path / "int8.onnx")
    int8 = OrtModel(tmp_path / "int8.onnx")
    assert _cos_to(model, int8, batches) > 0.98
    assert (tmp_path / "int8.onnx").stat().st_size < path.stat().st_size / 2
    with pytest.raises(ConfigError, match="overwrite"):
        quantize_int8(tmp_path / "fused.onnx", tmp_path / "int8.onnx")
    best, report = compile_cpu(model, batches[0], tmp_path / "serve", repeats=1)
    assert set(report["latency_s"]) == {"ort_fused_int8", "ort_int8", "torch_int8"}
    assert report["latency_s"][report["chosen"]] == min(report["latency_s"].values())
    assert _cos_to(model, best, batches) > 0.98


def test_int4_embedding_tables(tmp_path, tok, batches):
    pytest.importorskip("onnxruntime")
    import onnx

    from torchslim.hf.serve import OrtModel, export_transformer, fuse, quantize_int8

    model = _bert(len(tok), positions=256)  # a position table large enough to weigh in the file
    path = export_transformer(model, batches[0], tmp_path / "m.onnx")
    assert fuse(path, tmp_path / "fused_eln.onnx", model)
    with pytest.raises(ConfigError, match="embed_layer_norm=False"):
        quantize_int8(tmp_path / "fused_eln.onnx", tmp_path / "x.onnx", embedding_bits=4)
    assert fuse(path, tmp_path / "fused.onnx", model, embed_layer_norm=False)
    quantize_int8(tmp_path / "fused.onnx", tmp_path / "int8.onnx")
    quantize_int8(tmp_path / "fused.onnx", tmp_path / "int4.onnx", embedding_bits=4)
    graph = onnx.load(str(tmp_path / "int4.onnx")).graph
    assert sum(n.op_type == "GatherBlockQuantized" for n in graph.node) == 3  # word, position, token type
    assert not any(i.data_type == onnx.TensorProto.FLOAT and list(i.dims) in ([len(tok), 32], [256, 32])
                   for i in graph.initializer)  # no float table left
    values = (len(tok) + 256 + 2) * 32  # 1 byte each in int8; 0.5 + a scale and zero point per 32 in int4
    saved = (tmp_path / "int8.onnx").stat().st_size - (tmp_path / "int4.onnx").stat().st_size
    assert saved > 0.3 * values
    assert _cos_to(model, OrtModel(tmp_path / "int4.onnx"), batches) > 0.98


@pytest.mark.parametrize("remove", [{0: [1], 1: [1]}, {0: [1, 2]}])  # uniform, then different head counts
def test_fused_graph_of_a_head_pruned_model_equals_the_model(tmp_path, tok, batches, remove):
    pytest.importorskip("onnxruntime")
    import onnx

    from torchslim import hf
    from torchslim.hf.serve import OrtModel, export_transformer, fuse

    model = hf.prune_heads(_bert(len(tok)), remove)  # the config still says 4 heads
    path = export_transformer(model, batches[0], tmp_path / "m.onnx")
    assert fuse(path, tmp_path / "fused.onnx", model)
    uniform = len({len(v) for v in remove.values()}) == 1 and len(remove) == 2
    ops = {n.op_type for n in onnx.load(str(tmp_path / "fused.onnx")).graph.node}
    assert ("Attention" in ops) == uniform  # one head count for every layer, or attention left unfused
    fused = OrtModel(tmp_path / "fused.onnx")
    for b in batches:
        assert torch.allclose(fused(**b), model(**b).last_hidden_state, atol=1e-4)


def test_bad_inputs_fail_before_work(tmp_path, tok):
    model = _bert(len(tok))
    big = _vocab(tmp_path, n_extra=40)
    csv = tmp_path / "t.tsv"
    csv.write_text("text\nthe man\n \n")
    with pytest.raises(DataError, match="do not belong together"):
        text_loader(big, csv, ["text"], model=model)
    with pytest.raises(ConfigError, match="position embeddings"):
        text_loader(tok, csv, ["text"], model=model, max_length=128)
    with pytest.raises(DataError, match="tokenizes to nothing"):
        list(text_loader(tok, csv, ["text"], model=model, max_length=32))
    with pytest.raises(ConfigError, match="no column 'sentence'"):
        text_loader(tok, csv, ["sentence"])


def test_recipe_with_a_model_folder_and_sts_data(tmp_path, tok, sts_dir, batches):
    model = _bert(len(tok))
    folder = tmp_path / "tiny_bert"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""name: tiny-bert-int8
model: {{factory: "torchslim.hf.recipe:pretrained", kwargs: {{path: "{folder}"}}}}
data: {{factory: "torchslim.hf.recipe:stsb_splits", kwargs: {{data_dir: "{sts_dir}", tokenizer: "{folder}"}}}}
metric: "torchslim.hf.metrics:spearman_unit"
budget: {{max_accuracy_drop: 0.05}}
stages:
  - {{name: int8, type: DynamicQuantization}}
""")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = ts.compress(recipe, tmp_path / "out", log=lambda s: None)
        loaded = ts.load(tmp_path / "out" / "model.slim", trusted=["torchslim.hf.recipe:pretrained"])
    assert report["compressed"]["size_bytes"] < report["baseline"]["size_bytes"]
    assert abs(report["accuracy_drop"]) <= 0.05
    assert _cos_to(model, loaded, batches) > 0.99
    assert not any(type(m) is torch.nn.Linear for m in loaded.modules())


class Wide(torch.nn.Module):
    """A constructor that needs arguments: saving (and so sizing) it needs its factory."""

    def __init__(self, width):
        super().__init__()
        self.fc = torch.nn.Linear(4, width)

    def forward(self, x):
        return self.fc(x)


def test_profile_of_a_transformers_model_and_of_a_model_with_constructor_arguments(tmp_path, tok, batches):
    model = _bert(len(tok))
    p = ts.profile(model, batches[0], latency=False)
    saved = ts.save(model, tmp_path / "m.slim")
    assert p.size_bytes == saved.stat().st_size and p.params == sum(t.numel() for t in model.parameters())
    w4 = ts.profile(ts.quantize(model, ts.WeightOnly(4, group_size=16), example_inputs=batches[0]), batches[0],
                    latency=False)
    assert w4.size_bytes < p.size_bytes / 2 and p.macs > 0

    with pytest.raises(ts.TorchslimError, match="factory="):
        ts.profile(Wide(8), (torch.randn(2, 4),), latency=False)
    sized = ts.profile(Wide(8), (torch.randn(2, 4),), latency=False, factory=Wide, factory_kwargs={"width": 8})
    assert sized.size_bytes > 4 * 40 and sized.params == 40
