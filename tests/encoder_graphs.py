"""A small BERT-like encoder built with onnx.helper, spelled as torch.onnx.export (opset 17) spells one.

Token + position Gather embeddings (positions sliced from a buffer by Shape/Gather), LayerNormalization, then per layer:
Q/K/V MatMul + Add bias, Reshape (shape from Shape/Slice/Concat)/Transpose to heads, Q·Kᵀ MatMul, Div by
sqrt(head size), Add of the additive mask (built from attention_mask with Unsqueeze/Cast/Expand/Where), Softmax,
scores·V MatMul, Transpose/Reshape back, output projection, residual Add + LayerNormalization, FFN MatMul →
Erf GELU → MatMul, residual Add + LayerNormalization. Inputs int64 [batch, sequence], both dynamic. Node names
follow torch's (``/encoder/layer.0/attention/self/query/MatMul``).

Optional heads (``heads=``), each one more output: ``pooler`` (first token → Dense → Tanh, as BERT's pooler),
``logits`` (pooled → Gemm → [N, classes]), ``probs`` (Softmax of those), ``token_logits`` (MatMul + bias →
[N, T, labels], as a token classifier), ``mean_pooled`` (mask-weighted mean over tokens, as sentence embedders),
``normalized`` (that, L2-normalized).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from tests.helpers import make_proto


@dataclass(frozen=True)
class EncoderConfig:
    layers: int = 2
    hidden: int = 32
    heads: int = 4
    ffn: int = 64
    vocab: int = 100
    max_positions: int = 64
    classes: int = 3
    labels: int = 5
    seed: int = 0


class _Builder:
    def __init__(self, cfg: EncoderConfig) -> None:
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}

    def weight(self, name: str, shape: Sequence[int], scale: float | None = None) -> str:
        fan_in = shape[0] if len(shape) > 1 else 1
        scale = scale if scale is not None else 1.0 / np.sqrt(fan_in)
        self.inits[name] = (self.rng.standard_normal(shape) * scale).astype(np.float32)
        return name

    def const(self, name: str, value) -> str:
        self.inits[name] = np.asarray(value)
        return name

    def node(self, op: str, inputs: Sequence[str], name: str, **attrs) -> str:
        out = f"{name}_output_0"
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=name, **attrs))
        return out

    def linear(self, x: str, d_in: int, d_out: int, prefix: str, bias: bool = True) -> str:
        w = self.weight(f"{prefix.strip('/').replace('/', '.')}.weight", (d_in, d_out))
        y = self.node("MatMul", [x, w], f"{prefix}/MatMul")
        if not bias:
            return y
        b = self.weight(f"{prefix.strip('/').replace('/', '.')}.bias", (d_out,), 0.02)
        return self.node("Add", [b, y], f"{prefix}/Add")  # torch puts the bias first

    def layer_norm(self, x: str, prefix: str) -> str:
        d = self.cfg.hidden
        key = prefix.strip("/").replace("/", ".")
        gamma = self.const(f"{key}.weight", (1.0 + 0.1 * self.rng.standard_normal(d)).astype(np.float32))
        beta = self.const(f"{key}.bias", (0.05 * self.rng.standard_normal(d)).astype(np.float32))
        return self.node("LayerNormalization", [x, gamma, beta], f"{prefix}/LayerNormalization", axis=-1,
                         epsilon=1e-12)

    def shape_with(self, x: str, tail: Sequence[int], prefix: str) -> str:
        """Shape(x)[0:2] ++ tail: the dynamic [batch, sequence, ...] shape torch computes for a view()."""
        shape = self.node("Shape", [x], f"{prefix}/Shape")
        head = self.node("Slice", [shape, self.const(f"{prefix}.start", np.array([0], np.int64)),
                                   self.const(f"{prefix}.end", np.array([2], np.int64))], f"{prefix}/Slice")
        return self.node("Concat", [head, self.const(f"{prefix}.tail", np.array(tail, np.int64))],
                         f"{prefix}/Concat", axis=0)

    def gelu(self, x: str, prefix: str) -> str:
        div = self.node("Div", [x, self.const(f"{prefix}.sqrt2", np.float32(np.sqrt(2.0)))], f"{prefix}/Div")
        erf = self.node("Erf", [div], f"{prefix}/Erf")
        add = self.node("Add", [erf, self.const(f"{prefix}.one", np.float32(1.0))], f"{prefix}/Add")
        mul = self.node("Mul", [x, add], f"{prefix}/Mul")
        return self.node("Mul", [mul, self.const(f"{prefix}.half", np.float32(0.5))], f"{prefix}/Mul_1")

    def embeddings(self) -> str:
        cfg = self.cfg
        words = self.node("Gather", [self.weight("embeddings.word_embeddings.weight", (cfg.vocab, cfg.hidden), 1.0),
                                     "input_ids"], "/embeddings/word_embeddings/Gather")
        # position_ids[:, :sequence] of a [1, max_positions] buffer, the end read by Shape(start=1, end=2), as
        # torch's exporter spells it: ONNX inference propagates no value through that Shape (graphopt.shapes folds it)
        end = self.node("Shape", ["input_ids"], "/embeddings/Shape", start=1, end=2)
        buffer = self.const("embeddings.position_ids", np.arange(cfg.max_positions, dtype=np.int64)[None])
        ids = self.node("Slice", [buffer, self.const("embeddings.start", np.array([0], np.int64)), end,
                                  self.const("embeddings.slice_axes", np.array([1], np.int64))], "/embeddings/Slice")
        table = self.weight("embeddings.position_embeddings.weight", (cfg.max_positions, cfg.hidden), 0.5)
        positions = self.node("Gather", [table, ids], "/embeddings/position_embeddings/Gather")
        summed = self.node("Add", [words, positions], "/embeddings/Add")
        return self.layer_norm(summed, "/embeddings/LayerNorm")

    def additive_mask(self) -> str:
        """[N, 1, T, T]: 0 where attention_mask is 1, a large negative number where it is 0."""
        m = self.node("Unsqueeze", ["attention_mask", self.const("mask.axes", np.array([1, 2], np.int64))],
                      "/Unsqueeze")
        shape = self.node("Shape", ["attention_mask"], "/Shape")
        batch = self.node("Slice", [shape, self.const("mask.s0", np.array([0], np.int64)),
                                    self.const("mask.s1", np.array([1], np.int64))], "/Slice")
        seq = self.node("Slice", [shape, self.const("mask.s2", np.array([1], np.int64)),
                                  self.const("mask.s3", np.array([2], np.int64))], "/Slice_1")
        target = self.node("Concat", [batch, self.const("mask.one", np.array([1], np.int64)), seq, seq],
                           "/Concat", axis=0)
        expanded = self.node("Expand", [m, target], "/Expand")
        keep = self.node("Cast", [expanded], "/Cast", to=TensorProto.BOOL)
        return self.node("Where", [keep, self.const("mask.zero", np.float32(0.0)),
                                   self.const("mask.min", np.float32(-3.4028234663852886e38))], "/Where")

    def attention(self, x: str, mask: str, prefix: str) -> str:
        cfg = self.cfg
        size = cfg.hidden // cfg.heads

        def heads(name: str, perm: Sequence[int]) -> str:
            y = self.linear(x, cfg.hidden, cfg.hidden, f"{prefix}/self/{name}")
            y = self.node("Reshape", [y, self.shape_with(y, [cfg.heads, size], f"{prefix}/self/{name}/view")],
                          f"{prefix}/self/{name}/Reshape")
            return self.node("Transpose", [y], f"{prefix}/self/{name}/Transpose", perm=list(perm))

        q, k, v = heads("query", (0, 2, 1, 3)), heads("key", (0, 2, 3, 1)), heads("value", (0, 2, 1, 3))
        scores = self.node("MatMul", [q, k], f"{prefix}/self/MatMul")
        scores = self.node("Div", [scores, self.const(f"{prefix}.scale", np.float32(np.sqrt(size)))],
                           f"{prefix}/self/Div")
        scores = self.node("Add", [scores, mask], f"{prefix}/self/Add")
        probs = self.node("Softmax", [scores], f"{prefix}/self/Softmax", axis=-1)
        context = self.node("MatMul", [probs, v], f"{prefix}/self/MatMul_1")
        context = self.node("Transpose", [context], f"{prefix}/self/Transpose", perm=[0, 2, 1, 3])
        context = self.node("Reshape", [context, self.shape_with(context, [cfg.hidden], f"{prefix}/self/merge")],
                            f"{prefix}/self/Reshape")
        out = self.linear(context, cfg.hidden, cfg.hidden, f"{prefix}/output/dense")
        out = self.node("Add", [out, x], f"{prefix}/output/Add")
        return self.layer_norm(out, f"{prefix}/output/LayerNorm")

    def ffn(self, x: str, prefix: str) -> str:
        cfg = self.cfg
        h = self.linear(x, cfg.hidden, cfg.ffn, f"{prefix}/intermediate/dense")
        h = self.gelu(h, f"{prefix}/intermediate/intermediate_act_fn")
        out = self.linear(h, cfg.ffn, cfg.hidden, f"{prefix}/output/dense")
        out = self.node("Add", [out, x], f"{prefix}/output/Add")
        return self.layer_norm(out, f"{prefix}/output/LayerNorm")


def _float(name: str, shape: Sequence) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def bert_encoder(cfg: EncoderConfig = EncoderConfig(), heads: Sequence[str] = ()) -> onnx.ModelProto:
    """The encoder; its first output is ``last_hidden_state`` [batch, sequence, hidden], then one per head."""
    b = _Builder(cfg)
    hidden = b.embeddings()
    mask = b.additive_mask()
    for i in range(cfg.layers):
        hidden = b.attention(hidden, mask, f"/encoder/layer.{i}/attention")
        hidden = b.ffn(hidden, f"/encoder/layer.{i}")
    b.nodes.append(helper.make_node("Identity", [hidden], ["last_hidden_state"], name="/Identity"))
    outputs = [_float("last_hidden_state", ["batch", "sequence", cfg.hidden])]
    pooled = None
    if {"pooler", "logits", "probs"} & set(heads):
        first = b.node("Gather", [hidden, b.const("pooler.index", np.int64(0))], "/pooler/Gather", axis=1)
        pooled = b.node("Tanh", [b.linear(first, cfg.hidden, cfg.hidden, "/pooler/dense")], "/pooler/activation/Tanh")
    if "pooler" in heads:
        b.nodes.append(helper.make_node("Identity", [pooled], ["pooler_output"], name="/pooler/Identity"))
        outputs.append(_float("pooler_output", ["batch", cfg.hidden]))
    if {"logits", "probs"} & set(heads):
        w = b.weight("classifier.weight", (cfg.classes, cfg.hidden))
        logits = b.node("Gemm", [pooled, w, b.weight("classifier.bias", (cfg.classes,), 0.02)],
                        "/classifier/Gemm", transB=1)
        if "logits" in heads:
            b.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="/classifier/Identity"))
            outputs.append(_float("logits", ["batch", cfg.classes]))
        if "probs" in heads:
            b.nodes.append(helper.make_node("Softmax", [logits], ["probs"], name="/Softmax", axis=-1))
            outputs.append(_float("probs", ["batch", cfg.classes]))
    if "token_logits" in heads:
        tokens = b.linear(hidden, cfg.hidden, cfg.labels, "/token_classifier")
        b.nodes.append(helper.make_node("Identity", [tokens], ["token_logits"], name="/token_classifier/Identity"))
        outputs.append(_float("token_logits", ["batch", "sequence", cfg.labels]))
    if {"mean_pooled", "normalized"} & set(heads):
        weights = b.node("Unsqueeze", ["attention_mask", b.const("pool.axes", np.array([-1], np.int64))],
                         "/pool/Unsqueeze")
        weights = b.node("Cast", [weights], "/pool/Cast", to=TensorProto.FLOAT)
        summed = b.node("ReduceSum", [b.node("Mul", [hidden, weights], "/pool/Mul"),
                                      b.const("pool.axis", np.array([1], np.int64))], "/pool/ReduceSum", keepdims=0)
        count = b.node("ReduceSum", [weights, b.const("pool.axis1", np.array([1], np.int64))], "/pool/ReduceSum_1",
                       keepdims=0)
        count = b.node("Clip", [count, b.const("pool.min", np.float32(1e-9))], "/pool/Clip")
        mean = b.node("Div", [summed, count], "/pool/Div")
        if "mean_pooled" in heads:
            b.nodes.append(helper.make_node("Identity", [mean], ["mean_pooled"], name="/pool/Identity"))
            outputs.append(_float("mean_pooled", ["batch", cfg.hidden]))
        if "normalized" in heads:
            norm = b.node("ReduceL2", [mean], "/norm/ReduceL2", axes=[-1], keepdims=1)
            norm = b.node("Clip", [norm, b.const("norm.min", np.float32(1e-12))], "/norm/Clip")
            b.nodes.append(helper.make_node("Div", [mean, norm], ["normalized"], name="/norm/Div"))
            outputs.append(_float("normalized", ["batch", cfg.hidden]))
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
              for n in ("input_ids", "attention_mask")]
    proto = make_proto(b.nodes, inputs, outputs, b.inits, opset=17)
    onnx.checker.check_model(proto)
    return proto


def encoder_feeds(cfg: EncoderConfig = EncoderConfig(), batch: int = 2, sequence: int = 12, count: int = 4,
                  seed: int = 1) -> list[dict[str, np.ndarray]]:
    """``count`` feeds of token ids with a padded tail (attention_mask 0) in every other row."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        ids = rng.integers(0, cfg.vocab, size=(batch, sequence), dtype=np.int64)
        mask = np.ones((batch, sequence), np.int64)
        mask[::2, sequence - sequence // 4:] = 0
        feeds.append({"input_ids": ids, "attention_mask": mask})
    return feeds


def encoder_macs(cfg: EncoderConfig, batch: int, sequence: int) -> int:
    """MACs of the encoder's MatMuls counted by hand: per layer 4 hidden×hidden projections, the two FFN
    MatMuls, and Q·Kᵀ and scores·V (each sequence × sequence × hidden)."""
    tokens = batch * sequence
    per_layer = 4 * tokens * cfg.hidden * cfg.hidden + 2 * tokens * cfg.hidden * cfg.ffn \
        + 2 * batch * sequence * sequence * cfg.hidden
    return cfg.layers * per_layer
