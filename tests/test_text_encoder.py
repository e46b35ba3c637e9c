"""Nothing but image loading is image-only: a BERT-style text encoder (token ids in) converts too."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

import nq_onnx
from nq_onnx import QuantConfig
from nq_onnx.core import quant
from nq_onnx.inspect import inspect_model


class BertLayer(nn.Module):
    """A post-LN BERT encoder layer, written out as HuggingFace's BertLayer is: separate q/k/v, GELU MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.output = nn.Linear(dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.intermediate, self.out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        attention = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        context = (attention @ v).transpose(1, 2).reshape(b, t, d)
        x = self.norm1(x + self.output(context))
        return self.norm2(x + self.out(nn.functional.gelu(self.intermediate(x))))


class TinyBert(nn.Module):
    def __init__(self, vocab: int = 200, dim: int = 64, heads: int = 4, layers: int = 2, classes: int = 5):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.randn(1, 32, dim) * 0.1)
        self.layers = nn.ModuleList(BertLayer(dim, heads) for _ in range(layers))
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.position[:, : ids.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.head(x[:, 0])


def test_bert_style_encoder_converts_with_token_ids(tmp_path):
    torch.manual_seed(0)
    model = TinyBert().eval()
    ids = torch.randint(0, 200, (2, 16))
    path = tmp_path / "bert.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (ids,),
            str(path),
            input_names=["input_ids"],
            output_names=["logits"],
            dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    rng = np.random.default_rng(0)
    calib = tmp_path / "ids.npy"
    np.save(calib, rng.integers(0, 200, (32, 16)).astype(np.int64))
    config = QuantConfig(calib_size=32, attention_probabilities=True)  # A V too: every matmul of the encoder
    result = nq_onnx.convert(path, tmp_path / "bert.nq.onnx", calib, config)
    kinds = [s.kind for s in result.layers.layers]
    assert kinds.count("linear") == 2 * 6 + 1  # q, k, v, output, intermediate, out per layer, and the head
    assert kinds.count("act_matmul") >= 4
    ids_eval = rng.integers(0, 200, (8, 24)).astype(np.int64)  # another sequence length: dynamic axes kept
    want = ort.InferenceSession(str(path)).run(None, {"input_ids": ids_eval})[0]
    got = ort.InferenceSession(str(tmp_path / "bert.nq.onnx")).run(None, {"input_ids": ids_eval})[0]
    assert quant.sqnr_db(want, got) > 20
    inspection = inspect_model(onnx.load(str(tmp_path / "bert.nq.onnx")))
    assert not [k for k in inspection.weight_layers if not k.integer]
