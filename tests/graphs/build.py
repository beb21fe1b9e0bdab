"""Builds the tiny hand-made attention graphs the fuse tests use: one per pattern variant that
flash-ort must fuse, and one per skip reason that it must leave alone.

Usage: .venv/bin/python tests/graphs/build.py   (writes tests/graphs/*.onnx; needs onnx, numpy)
Each graph is a few KB. Shapes: batch "B", sequence "S" (symbolic), 4 heads of dim 8, hidden 32.
"""

import os

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

HERE = os.path.dirname(os.path.abspath(__file__))
H, D, HID = 4, 8, 32
RNG = np.random.default_rng(0)


class G:
    """A graph under construction: nodes, initializers, inputs, outputs."""

    def __init__(self):
        self.nodes, self.inits, self.inputs, self.outputs, self.k = [], [], [], [], 0

    def name(self, base):
        self.k += 1
        return f"{base}_{self.k}"

    def op(self, op, inputs, n_out=1, domain=None, **attrs):
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(h.make_node(op, inputs, outs, name=self.name(op), domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype=np.float32, name=None):
        arr = np.asarray(value, dtype=dtype)
        n = name or self.name("c")
        self.inits.append(nh.from_array(arr, n))
        return n

    def input(self, name, elem, shape):
        self.inputs.append(h.make_tensor_value_info(name, elem, shape))
        return name

    def output(self, name, elem=T.FLOAT, shape=None):
        self.outputs.append(h.make_tensor_value_info(name, elem, shape))

    def save(self, fname, opset=17, extra_opsets=()):
        g = h.make_graph(self.nodes, fname, self.inputs, self.outputs, self.inits)
        m = h.make_model(g, opset_imports=[h.make_opsetid("", opset), *extra_opsets], producer_name="flash-ort-tests")
        m.ir_version = 10 if opset >= 21 else 8
        # Outputs declared without a shape take the one shape inference finds (the checker needs one).
        inferred = {vi.name: vi for vi in onnx.shape_inference.infer_shapes(m).graph.value_info}
        for o in m.graph.output:
            if not o.type.tensor_type.HasField("shape") and o.name in inferred:
                o.type.CopyFrom(inferred[o.name].type)
            elif not o.type.tensor_type.HasField("shape"):
                node = next(n for n in m.graph.node if o.name in n.output)
                src = inferred.get(node.input[0]) or next(i for i in m.graph.input if i.name == node.input[0])
                o.type.CopyFrom(src.type)
        onnx.checker.check_model(m)
        onnx.shape_inference.infer_shapes(m, strict_mode=True)
        onnx.save(m, os.path.join(HERE, fname))


def w(shape):
    return (RNG.standard_normal(shape) * 0.2).astype(np.float32)


def heads(g, x, perm=(0, 2, 1, 3)):
    """x [B,S,HID] → linear → [B,S,H,D] → transpose(perm)."""
    y = g.op("MatMul", [x, g.const(w((HID, HID)))])
    y = g.op("Reshape", [y, g.const([0, 0, H, D], np.int64)])
    return g.op("Transpose", [y], perm=list(perm)) if perm else y


def merge(g, y):
    """[B,H,S,D] → [B,S,HID]."""
    y = g.op("Transpose", [y], perm=[0, 2, 1, 3])
    return g.op("Reshape", [y, g.const([0, 0, HID], np.int64)])


def encoder_start(g):
    return g.input("x", T.FLOAT, ["B", "S", HID])


def finish(g, y, fname, **kw):
    out = merge(g, y)
    g.nodes.append(h.make_node("Identity", [out], ["y"], name="out"))
    g.output("y", T.FLOAT, ["B", "S", HID])
    g.save(fname, **kw)


def hf_padding_mask(g):
    """attention_mask [B,S] int64 → (1 − m) · min, shaped [B,1,1,S]."""
    m = g.input("attention_mask", T.INT64, ["B", "S"])
    m = g.op("Unsqueeze", [m, g.const([1, 2], np.int64)])
    m = g.op("Cast", [m], to=T.FLOAT)
    m = g.op("Sub", [g.const(1.0), m])
    return g.op("Mul", [m, g.const(np.finfo(np.float32).min)])


# ---- variants that must fuse -------------------------------------------------------------


def bert_eager():
    """HF eager: K by BSHD→BHDS transpose, Div(√d) on scores, additive padding mask, Dropout."""
    g = G()
    x = encoder_start(g)
    q, v = heads(g, x), heads(g, x)
    kt = heads(g, x, perm=(0, 2, 3, 1))
    s = g.op("MatMul", [q, kt])
    s = g.op("Div", [s, g.const(np.sqrt(D))])
    s = g.op("Add", [s, hf_padding_mask(g)])
    p = g.op("Softmax", [s], axis=-1)
    p = g.op("Dropout", [p])
    finish(g, g.op("MatMul", [p, v]), "fuse_bert_eager.onnx")


def sdpa_sqrt_scale():
    """TorchScript SDPA: scale from Shape(Q), √scale on Q and on Kᵀ, bool mask → Where(m,0,−inf)
    → Add, NaN guard after Softmax."""
    g = G()
    x = encoder_start(g)
    q, k, v = heads(g, x), heads(g, x), heads(g, x)
    sh = g.op("Shape", [q])
    d = g.op("Slice", [sh, g.const([-1], np.int64), g.const([np.iinfo(np.int64).max], np.int64)])
    d = g.op("Cast", [d], to=T.FLOAT)
    scale = g.op("Div", [g.const(1.0), g.op("Sqrt", [d])])
    sq = g.op("Sqrt", [scale])
    kt = g.op("Transpose", [k], perm=[0, 1, 3, 2])
    s = g.op("MatMul", [g.op("Mul", [q, sq]), g.op("Mul", [kt, sq])])
    m = g.input("attention_mask", T.BOOL, ["B", 1, 1, "S"])
    bias = g.op("Where", [m, g.const(0.0), g.const(-np.inf)])
    s = g.op("Add", [s, bias])
    p = g.op("Softmax", [s], axis=-1)
    p = g.op("Where", [g.op("IsNaN", [p]), g.const(0.0), p])
    finish(g, g.op("MatMul", [p, v]), "fuse_sdpa_sqrt_scale.onnx")


def dynamo_k_reshape():
    """Dynamo exporter, opset 18: Kᵀ as Reshape([B·H,S,D]) → Transpose[0,2,1] → Reshape, Mul scale,
    static shapes (B=2, S=5)."""
    g = G()
    x = g.input("x", T.FLOAT, [2, 5, HID])
    q, k, v = heads(g, x), heads(g, x), heads(g, x)
    k3 = g.op("Reshape", [k, g.const([2 * H, 5, D], np.int64)])
    k3 = g.op("Transpose", [k3], perm=[0, 2, 1])
    kt = g.op("Reshape", [k3, g.const([2, H, D, 5], np.int64)])
    s = g.op("MatMul", [q, kt])
    s = g.op("Mul", [s, g.const(1 / np.sqrt(D))])
    p = g.op("Softmax", [s], axis=-1)
    out = merge(g, g.op("MatMul", [p, v]))
    g.nodes.append(h.make_node("Identity", [out], ["y"], name="out"))
    g.output("y", T.FLOAT, [2, 5, HID])
    g.save("fuse_dynamo_k_reshape.onnx", opset=18)


def gqa_repeat_kv():
    """LLaMA-style GQA: 4 query heads, 2 KV heads, repeat_kv as Unsqueeze(2) → Expand → Reshape,
    causal mask from a constant-free comparison passed as an additive bias input."""
    g = G()
    x = encoder_start(g)
    q = heads(g, x)
    kv_heads, rep = 2, 2

    def kv():
        y = g.op("MatMul", [x, g.const(w((HID, kv_heads * D)))])
        y = g.op("Reshape", [y, g.const([0, 0, kv_heads, D], np.int64)])
        return g.op("Transpose", [y], perm=[0, 2, 1, 3])

    def repeat(t):
        shp = g.op("Shape", [t])
        b = g.op("Gather", [shp, g.const(0, np.int64)], axis=0)
        s_ = g.op("Gather", [shp, g.const(2, np.int64)], axis=0)
        u = lambda z: g.op("Unsqueeze", [z, g.const([0], np.int64)])
        e_shape = g.op("Concat", [u(b), g.const([kv_heads, rep], np.int64), u(s_), g.const([D], np.int64)], axis=0)
        r_shape = g.op("Concat", [u(b), g.const([kv_heads * rep], np.int64), u(s_), g.const([D], np.int64)], axis=0)
        e = g.op("Expand", [g.op("Unsqueeze", [t, g.const([2], np.int64)]), e_shape])
        return g.op("Reshape", [e, r_shape])

    k, v = repeat(kv()), repeat(kv())
    s = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])
    s = g.op("Mul", [s, g.const(1 / np.sqrt(D))])
    bias = g.input("bias", T.FLOAT, ["B", 1, "S", "S"])
    s = g.op("Add", [s, bias])
    p = g.op("Softmax", [s], axis=-1)
    finish(g, g.op("MatMul", [p, v]), "fuse_gqa_repeat_kv.onnx")


def softcap(fname="fuse_softcap.onnx", scale_on_scores=False):
    """Gemma-2 style softcap: scale (on Q, or on the scores), then Div(30) → Tanh → Mul(30)."""
    g = G()
    x = encoder_start(g)
    q, k, v = heads(g, x), heads(g, x), heads(g, x)
    if scale_on_scores:
        s = g.op("Mul", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])]), g.const(0.25)])
    else:
        s = g.op("MatMul", [g.op("Mul", [q, g.const(0.25)]), g.op("Transpose", [k], perm=[0, 1, 3, 2])])
    s = g.op("Mul", [g.op("Tanh", [g.op("Div", [s, g.const(30.0)])]), g.const(30.0)])
    p = g.op("Softmax", [s], axis=3)
    finish(g, g.op("MatMul", [p, v]), fname)


def gpt2_causal_buffer():
    """GPT-2: Where(bias[:, :, 0:S, 0:S], scores, −10000) with a constant lower-triangular buffer;
    the Slice bounds come from Shape(K)."""
    g = G()
    x = encoder_start(g)
    q, k, v = heads(g, x), heads(g, x), heads(g, x)
    s = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])
    s = g.op("Div", [s, g.const(np.sqrt(D))])
    buf = g.const(np.tril(np.ones((16, 16), dtype=bool))[None, None], np.bool_)
    sq = g.op("Gather", [g.op("Shape", [q]), g.const(2, np.int64)], axis=0)
    sk = g.op("Gather", [g.op("Shape", [k]), g.const(2, np.int64)], axis=0)
    start = g.op("Unsqueeze", [g.op("Sub", [sk, sq]), g.const([0], np.int64)])
    end = g.op("Unsqueeze", [sk, g.const([0], np.int64)])
    row = g.op("Slice", [buf, start, end, g.const([2], np.int64)])
    cond = g.op("Slice", [row, g.const([0], np.int64), end, g.const([3], np.int64)])
    s = g.op("Where", [cond, s, g.const(-10000.0)])
    p = g.op("Softmax", [s], axis=-1)
    finish(g, g.op("MatMul", [p, v]), "fuse_gpt2_causal_buffer.onnx")


def t5_position_bias():
    """T5: no scale at all, a learned relative-position bias (constant [1,H,S,S], S=6) added."""
    g = G()
    x = g.input("x", T.FLOAT, ["B", 6, HID])
    q, k, v = heads(g, x), heads(g, x), heads(g, x)
    s = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])
    s = g.op("Add", [s, g.const(w((1, H, 6, 6)))])
    p = g.op("Softmax", [s], axis=-1)
    out = merge(g, g.op("MatMul", [p, v]))
    g.nodes.append(h.make_node("Identity", [out], ["y"], name="out"))
    g.output("y", T.FLOAT, ["B", 6, HID])
    g.save("fuse_t5_position_bias.onnx")


def cross_attention():
    """Decoder cross attention: Q from x (length S), K/V from memory (length M ≠ S), padding mask on
    the memory."""
    g = G()
    x = encoder_start(g)
    mem = g.input("memory", T.FLOAT, ["B", "M", HID])
    q, k, v = heads(g, x), heads(g, mem), heads(g, mem)
    s = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])
    s = g.op("Mul", [s, g.const(1 / np.sqrt(D))])
    m = g.input("memory_mask", T.FLOAT, ["B", 1, 1, "M"])
    s = g.op("Add", [s, m])
    p = g.op("Softmax", [s], axis=-1)
    finish(g, g.op("MatMul", [p, v]), "fuse_cross_attention.onnx")


def fp16_cast_softmax():
    """float16 graph with Softmax computed in float32 between Casts."""
    g = G()
    qn = g.input("q", T.FLOAT16, ["B", H, "S", D])
    kn = g.input("k", T.FLOAT16, ["B", H, "S", D])
    vn = g.input("v", T.FLOAT16, ["B", H, "S", D])
    s = g.op("MatMul", [qn, g.op("Transpose", [kn], perm=[0, 1, 3, 2])])
    s = g.op("Mul", [s, g.const(1 / np.sqrt(D), np.float16)])
    p = g.op("Cast", [g.op("Softmax", [g.op("Cast", [s], to=T.FLOAT)], axis=-1)], to=T.FLOAT16)
    y = g.op("MatMul", [p, vn])
    g.nodes.append(h.make_node("Identity", [y], ["y"], name="out"))
    g.output("y", T.FLOAT16, ["B", H, "S", D])
    g.save("fuse_fp16_cast_softmax.onnx")


def batched_3d():
    """Older BART/Whisper/Marian: [B·H, S, D] batched MatMuls, Q scaled before the product, an
    additive [B·H, S, S] mask."""
    g = G()
    qn = g.input("q", T.FLOAT, ["BH", "S", D])
    kn = g.input("k", T.FLOAT, ["BH", "S", D])
    vn = g.input("v", T.FLOAT, ["BH", "S", D])
    m = g.input("mask", T.FLOAT, ["BH", "S", "S"])
    s = g.op("MatMul", [g.op("Mul", [qn, g.const(1 / np.sqrt(D))]), g.op("Transpose", [kn], perm=[0, 2, 1])])
    p = g.op("Softmax", [g.op("Add", [s, m])], axis=-1)
    y = g.op("MatMul", [p, vn])
    g.nodes.append(h.make_node("Identity", [y], ["y"], name="out"))
    g.output("y", T.FLOAT, ["BH", "S", D])
    g.save("fuse_batched_3d.onnx")


def subgraph_if():
    """Attention inside both branches of an If (searched like the main graph)."""
    def branch(name):
        g = G()
        s = g.op("MatMul", ["q", g.op("Transpose", ["k"], perm=[0, 1, 3, 2])])
        s = g.op("Div", [s, g.const(np.sqrt(D))])
        p = g.op("Softmax", [s], axis=-1)
        y = g.op("MatMul", [p, "v"])
        g.nodes.append(h.make_node("Identity", [y], [name + "_y"], name=name + "_out"))
        return h.make_graph(g.nodes, name, [], [h.make_tensor_value_info(name + "_y", T.FLOAT, ["B", H, "S", D])], g.inits)

    g = G()
    for n in "qkv":
        g.input(n, T.FLOAT, ["B", H, "S", D])
    g.input("flag", T.BOOL, [])
    g.nodes.append(h.make_node("If", ["flag"], ["y"], name="if", then_branch=branch("then"), else_branch=branch("else")))
    g.output("y", T.FLOAT, ["B", H, "S", D])
    g.save("fuse_subgraph_if.onnx")


def hf_causal_window(fname="fuse_hf_causal_window.onnx", shift=0):
    """Hugging Face decoder mask: And(ones, kv ≤ q, kv > q − 3, padding) over Range indices, as
    Where(mask, 0, min), added to the scores (causal + sliding window 3 + right padding). With
    `shift`, the triangle is kv ≤ q + shift: not causal, so it must stay a mask."""
    g = G()
    x = encoder_start(g)
    q, k, v = heads(g, x), heads(g, x), heads(g, x)
    s = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])
    s = g.op("Mul", [s, g.const(1 / np.sqrt(D))])
    am = g.input("attention_mask", T.INT64, ["B", "S"])
    n = g.op("Squeeze", [g.op("Shape", [x], start=1, end=2), g.const([0], np.int64)])
    idx = g.op("Range", [g.const(0, np.int64), n, g.const(1, np.int64)])
    kv = g.op("Unsqueeze", [idx, g.const([0, 1, 2], np.int64)])  # [1, 1, 1, S]
    qi = g.op("Unsqueeze", [idx, g.const([0, 1, 3], np.int64)])  # [1, 1, S, 1]
    causal = g.op("LessOrEqual", [kv, g.op("Add", [qi, g.const(shift, np.int64)]) if shift else qi])
    window = g.op("Greater", [kv, g.op("Sub", [qi, g.const(3, np.int64)])])
    pad = g.op("Cast", [g.op("Unsqueeze", [am, g.const([1, 2], np.int64)])], to=T.BOOL)
    keep = g.op("And", [g.op("And", [causal, window]), pad])
    bias = g.op("Where", [keep, g.const(0.0), g.const(np.finfo(np.float32).min)])
    p = g.op("Softmax", [g.op("Add", [s, bias])], axis=-1)
    finish(g, g.op("MatMul", [p, v]), fname)


def hf_bidirectional(fname="fuse_hf_bidirectional_mask.onnx", as_bool=False):
    """Hugging Face encoder mask: And(And(true, q ≥ 0), padding [B,1,1,S]) broadcast to [B,1,S,S]
    and Expanded, then Where(mask, 0, min) added to the scores (or, `as_bool`, a standard
    Attention's bool mask). The fused node must read the padding vector, not the S×S mask."""
    g = G()
    x = encoder_start(g)
    q, k, v = heads(g, x), heads(g, x), heads(g, x)
    am = g.input("attention_mask", T.INT64, ["B", "S"])
    b = g.op("Shape", [am], start=0, end=1)
    n = g.op("Shape", [am], start=1, end=2)
    idx = g.op("Range", [g.const(0, np.int64), g.op("Squeeze", [n, g.const([0], np.int64)]), g.const(1, np.int64)])
    qi = g.op("Unsqueeze", [idx, g.const([0, 1, 3], np.int64)])  # [1, 1, S, 1]
    rows = g.op("GreaterOrEqual", [qi, g.const(0, np.int64)])
    pad = g.op("Cast", [g.op("Unsqueeze", [am, g.const([1, 2], np.int64)])], to=T.BOOL)
    keep = g.op("And", [g.op("And", [g.const(True, np.bool_), rows]), pad])
    keep = g.op("Expand", [keep, g.op("Concat", [b, g.const([1], np.int64), n, n], axis=0)])
    if as_bool:
        g.nodes.append(h.make_node("Attention", [q, k, v, keep], ["attn"], name="attn", scale=0.3))
        finish(g, "attn", fname, opset=23)
        return
    s = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])
    s = g.op("Mul", [s, g.const(1 / np.sqrt(D))])
    bias = g.op("Where", [keep, g.const(0.0), g.const(np.finfo(np.float32).min)])
    p = g.op("Softmax", [g.op("Add", [s, bias])], axis=-1)
    finish(g, g.op("MatMul", [p, v]), fname)


def onnx_attention_gap(name, nonpad=False, three_d=False):
    """Standard Attention omitting an optional input before a present one: past without a mask
    (opset 23), or nonpad_kv_seqlen without mask or past (opset 24). ORT 1.20–1.23 cannot load a
    custom-op node with such a gap, so the rewrite must fill it."""
    g = G()
    if three_d:
        qn = g.input("q", T.FLOAT, ["B", "S", H * D])
        kn = g.input("k", T.FLOAT, ["B", "S", 2 * D])
        vn = g.input("v", T.FLOAT, ["B", "S", 2 * D])
        heads_attrs = dict(q_num_heads=H, kv_num_heads=2)
    else:
        qn = g.input("q", T.FLOAT, ["B", H, "S", D])
        kn = g.input("k", T.FLOAT, ["B", 2, "S", D])
        vn = g.input("v", T.FLOAT, ["B", 2, "S", D])
        heads_attrs = {}
    if nonpad:
        lens = g.input("nonpad_kv_seqlen", T.INT64, ["B"])
        g.nodes.append(h.make_node("Attention", [qn, kn, vn, "", "", "", lens], ["y"], name="attn", scale=0.3, **heads_attrs))
        g.output("y", T.FLOAT, ["B", "S", H * D] if three_d else ["B", H, "S", D])
        g.save(name, opset=24)
        return
    pk = g.input("past_key", T.FLOAT, ["B", 2, "P", D])
    pv = g.input("past_value", T.FLOAT, ["B", 2, "P", D])
    g.nodes.append(h.make_node("Attention", [qn, kn, vn, "", pk, pv], ["y", "present_key", "present_value"], name="attn", scale=0.3))
    g.output("y", T.FLOAT, ["B", H, "S", D])
    g.output("present_key", T.FLOAT, ["B", 2, "T", D])
    g.output("present_value", T.FLOAT, ["B", 2, "T", D])
    g.save(name, opset=23)


def kv_cache():
    """A decoder step with a KV cache: K/V = Concat(past, new) (also the present outputs), an
    additive mask over all P + S keys. Fused with the mask; never is_causal (Sq ≠ Skv)."""
    g = G()
    x = encoder_start(g)
    q, k, v = heads(g, x), heads(g, x), heads(g, x)
    pk = g.input("past_key", T.FLOAT, ["B", H, "past_sequence", D])
    pv = g.input("past_value", T.FLOAT, ["B", H, "past_sequence", D])
    g.nodes.append(h.make_node("Concat", [pk, k], ["present_key"], name="cat_k", axis=2))
    g.nodes.append(h.make_node("Concat", [pv, v], ["present_value"], name="cat_v", axis=2))
    s = g.op("MatMul", [q, g.op("Transpose", ["present_key"], perm=[0, 1, 3, 2])])
    s = g.op("Mul", [s, g.const(1 / np.sqrt(D))])
    s = g.op("Add", [s, g.input("bias", T.FLOAT, ["B", 1, "S", "total_sequence"])])
    p = g.op("Softmax", [s], axis=-1)
    out = merge(g, g.op("MatMul", [p, "present_value"]))
    g.nodes.append(h.make_node("Identity", [out], ["y"], name="out"))
    g.output("y", T.FLOAT, ["B", "S", HID])
    g.output("present_key", T.FLOAT, None)
    g.output("present_value", T.FLOAT, None)
    g.save("fuse_kv_cache.onnx")


def trilu_causal():
    """TorchScript SDPA is_causal: Where(Trilu(ones[S, S]), scores, −inf)."""
    g = G()
    x = encoder_start(g)
    q, k, v = heads(g, x), heads(g, x), heads(g, x)
    s = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])
    s = g.op("Div", [s, g.const(np.sqrt(D))])
    n = g.op("Shape", [x], start=1, end=2)
    ones = g.op("ConstantOfShape", [g.op("Concat", [n, n], axis=0)], value=nh.from_array(np.array([True]), "one"))
    tri = g.op("Trilu", [ones], upper=0)
    s = g.op("Where", [tri, s, g.const(-np.inf)])
    p = g.op("Softmax", [s], axis=-1)
    finish(g, g.op("MatMul", [p, v]), "fuse_trilu_causal.onnx")


def onnx_attention(name="fuse_onnx_attention.onnx", causal=0, kv_seq="S", qk_out=False):
    """Standard ONNX Attention (opset 23), 4D, optional causal."""
    g = G()
    qn = g.input("q", T.FLOAT, ["B", H, "S", D])
    kn = g.input("k", T.FLOAT, ["B", 2, kv_seq, D])
    vn = g.input("v", T.FLOAT, ["B", 2, kv_seq, D])
    outs = ["y", "", "", "qk"] if qk_out else ["y"]
    g.nodes.append(h.make_node("Attention", [qn, kn, vn], outs, name="attn", is_causal=causal, scale=0.3))
    g.output("y", T.FLOAT, ["B", H, "S", D])
    if qk_out:
        g.output("qk", T.FLOAT, ["B", H, "S", kv_seq])
    g.save(name, opset=23)


# ---- graphs that must be left alone (one per skip reason) ------------------------------------


def simple(fname, *, axis=-1, scale_input=False, scores_out=False, extra_reader=False,
           mask_rank5=False, dropout_training=False, bad_perm=False, fill=None, mask_then_scale=False,
           bad_softcap=False, dtype=T.FLOAT, rank2=False, pv_swapped=False, relu=False):
    g = G()
    shape = ["S", D] if rank2 else ["B", H, "S", D]
    qn, kn, vn = (g.input(n, dtype, shape) for n in "qkv")
    npdt = np.float64 if dtype == T.DOUBLE else np.float32
    perm = [1, 0] if rank2 else ([1, 0, 3, 2] if bad_perm else [0, 1, 3, 2])
    s = g.op("MatMul", [qn, g.op("Transpose", [kn], perm=perm)])
    if relu:
        s = g.op("Relu", [s])
    if mask_then_scale:
        s = g.op("Add", [s, g.input("mask", T.FLOAT, ["B", 1, 1, "S"])])
    if scale_input:
        s = g.op("Mul", [s, g.input("scale", T.FLOAT, [])])
    else:
        s = g.op("Mul", [s, g.const(1 / np.sqrt(D), npdt)])
    if bad_softcap:
        s = g.op("Mul", [g.op("Tanh", [g.op("Div", [s, g.const(30.0)])]), g.const(50.0)])
    if mask_rank5:
        s = g.op("Add", [s, g.input("mask", T.FLOAT, [1, 1, 1, "S", "S"])])
    if fill is not None:
        s = g.op("Where", [g.input("keep", T.BOOL, ["B", 1, 1, "S"]), s, g.const(fill)])
    p = g.op("Softmax", [s], axis=axis)
    if dropout_training:
        p = g.op("Dropout", [p, g.const(0.1), g.input("training", T.BOOL, [])])
    y = g.op("MatMul", [vn, p] if pv_swapped else [p, vn])
    g.nodes.append(h.make_node("Identity", [y], ["y"], name="out"))
    g.output("y", dtype, None)
    if scores_out:
        g.outputs.append(h.make_tensor_value_info(s, dtype, None))
    if extra_reader:
        r = g.op("Neg", [s])
        g.output(r, dtype, None)
    g.save(fname, opset=18)


def more_negatives():
    """The remaining constructible skip reasons, one small graph each."""
    # batch-mismatch: K has a static batch of 1 that MatMul broadcasts over Q's batch of 2.
    g = G()
    qn = g.input("q", T.FLOAT, [2, H, 5, D])
    kn = g.input("k", T.FLOAT, [1, H, 5, D])
    vn = g.input("v", T.FLOAT, [2, H, 5, D])
    p = g.op("Softmax", [g.op("MatMul", [qn, g.op("Transpose", [kn], perm=[0, 1, 3, 2])])], axis=-1)
    g.nodes.append(h.make_node("MatMul", [p, vn], ["y"], name="pv"))
    g.output("y", T.FLOAT, [2, H, 5, D])
    g.save("skip_batch-mismatch.onnx")

    # pv-matmul-missing: the probabilities go through a Relu before the MatMul with V.
    g = G()
    qn, kn, vn = (g.input(n, T.FLOAT, ["B", H, "S", D]) for n in "qkv")
    p = g.op("Softmax", [g.op("MatMul", [qn, g.op("Transpose", [kn], perm=[0, 1, 3, 2])])], axis=-1)
    g.nodes.append(h.make_node("MatMul", [g.op("Relu", [p]), vn], ["y"], name="pv"))
    g.output("y", T.FLOAT, ["B", H, "S", D])
    g.save("skip_pv-matmul-missing.onnx")

    # score-path-ambiguous: two products added before the Softmax.
    g = G()
    qn, kn, vn = (g.input(n, T.FLOAT, ["B", H, "S", D]) for n in "qkv")
    s1 = g.op("MatMul", [qn, g.op("Transpose", [kn], perm=[0, 1, 3, 2])])
    s2 = g.op("MatMul", [kn, g.op("Transpose", [qn], perm=[0, 1, 3, 2])])
    p = g.op("Softmax", [g.op("Add", [s1, s2])], axis=-1)
    g.nodes.append(h.make_node("MatMul", [p, vn], ["y"], name="pv"))
    g.output("y", T.FLOAT, ["B", H, "S", D])
    g.save("skip_score-path-ambiguous.onnx")

    # no-score-matmul: a Softmax over a sum of inputs, then a MatMul.
    g = G()
    a, b = g.input("a", T.FLOAT, ["B", H, "S", "S"]), g.input("b", T.FLOAT, ["B", H, "S", "S"])
    vn = g.input("v", T.FLOAT, ["B", H, "S", D])
    p = g.op("Softmax", [g.op("Add", [a, b])], axis=-1)
    g.nodes.append(h.make_node("MatMul", [p, vn], ["y"], name="pv"))
    g.output("y", T.FLOAT, ["B", H, "S", D])
    g.save("skip_no-score-matmul.onnx")

    # rank-unknown: the scores come through an op flash-ort does not infer shapes for (Einsum).
    g = G()
    qn, kn, vn = (g.input(n, T.FLOAT, ["B", H, "S", D]) for n in "qkv")
    s = g.op("Einsum", [qn, kn], equation="bhqd,bhkd->bhqk")
    p = g.op("Softmax", [s], axis=-1)
    g.nodes.append(h.make_node("MatMul", [p, vn], ["y"], name="pv"))
    g.output("y", T.FLOAT, ["B", H, "S", D])
    g.save("skip_rank-unknown.onnx")

    # mask-dtype-mismatch: float16 attention with a float32 mask added after a Cast.
    g = G()
    qn, kn, vn = (g.input(n, T.FLOAT16, ["B", H, "S", D]) for n in "qkv")
    s = g.op("Cast", [g.op("MatMul", [qn, g.op("Transpose", [kn], perm=[0, 1, 3, 2])])], to=T.FLOAT)
    s = g.op("Add", [s, g.input("mask", T.FLOAT, ["B", 1, 1, "S"])])
    p = g.op("Cast", [g.op("Softmax", [s], axis=-1)], to=T.FLOAT16)
    g.nodes.append(h.make_node("MatMul", [p, vn], ["y"], name="pv"))
    g.output("y", T.FLOAT16, ["B", H, "S", D])
    g.save("skip_mask-dtype-mismatch.onnx")


def ort_optimized_bert(layers=3):
    """BERT layers as ONNX Runtime's transformer optimizer leaves them with attention fusion off
    (the ort_opt_flash form of bench/model_bench.py): SkipLayerNormalization and BiasGelu
    (com.microsoft) between layers, so every shape after layer 0 goes through contrib ops; one
    shape computation from Shape(x) shared by every layer's head split and merge Reshapes (and
    by a Reshape outside attention, which must keep it); K split as BSHD → BHDS."""
    g = G()
    x = encoder_start(g)
    mask = hf_padding_mask(g)
    shape = g.op("Shape", [x])

    def dim(i):
        d = g.op("Gather", [shape, g.const(i, np.int64)], axis=0)
        return g.op("Unsqueeze", [d, g.const([0], np.int64)])

    b, s = dim(0), dim(1)
    split_shape = g.op("Concat", [b, s, g.const([H, D], np.int64)], axis=0)
    merge_shape = g.op("Concat", [b, s, g.const([HID], np.int64)], axis=0)

    def linear(t, bias=True):
        y = g.op("MatMul", [t, g.const(w((HID, HID)))])
        return g.op("Add", [g.const(w(HID)), y]) if bias else y

    def split(t, perm):
        return g.op("Transpose", [g.op("Reshape", [linear(t), split_shape])], perm=list(perm))

    def skip_ln(t, skip):
        ins = [t, skip, g.const(1 + w(HID)), g.const(w(HID)), g.const(w(HID))]
        return g.op("SkipLayerNormalization", ins, domain="com.microsoft", epsilon=1e-12)

    hidden = g.op("LayerNormalization", [x, g.const(1 + w(HID)), g.const(w(HID))], axis=-1)
    for _ in range(layers):
        q, kt, v = split(hidden, (0, 2, 1, 3)), split(hidden, (0, 2, 3, 1)), split(hidden, (0, 2, 1, 3))
        sc = g.op("Mul", [g.op("MatMul", [q, kt]), g.const(1 / np.sqrt(D))])
        p = g.op("Softmax", [g.op("Add", [sc, mask])], axis=-1)
        y = g.op("Transpose", [g.op("MatMul", [p, v])], perm=[0, 2, 1, 3])
        y = g.op("Reshape", [y, merge_shape])
        hidden = skip_ln(linear(y, bias=False), hidden)
        ffn = g.op("BiasGelu", [linear(hidden, bias=False), g.const(w(HID))], domain="com.microsoft")
        hidden = skip_ln(linear(ffn, bias=False), hidden)
    g.nodes.append(h.make_node("Reshape", [hidden, merge_shape], ["y"], name="out"))
    g.output("y", T.FLOAT, ["B", "S", HID])
    g.save("fuse_ort_optimized_bert.onnx", extra_opsets=[h.make_opsetid("com.microsoft", 1)])


def main():
    bert_eager()
    sdpa_sqrt_scale()
    dynamo_k_reshape()
    gqa_repeat_kv()
    softcap()
    softcap("fuse_softcap_score_scale.onnx", scale_on_scores=True)
    gpt2_causal_buffer()
    t5_position_bias()
    cross_attention()
    fp16_cast_softmax()
    onnx_attention()
    onnx_attention("fuse_onnx_attention_causal.onnx", causal=1)
    batched_3d()
    subgraph_if()
    hf_causal_window()
    hf_causal_window("fuse_shifted_triangle_not_causal.onnx", shift=1)
    trilu_causal()
    kv_cache()
    hf_bidirectional()
    hf_bidirectional("fuse_hf_bidirectional_bool.onnx", as_bool=True)
    onnx_attention_gap("fuse_onnx_attention_past_no_mask.onnx")
    onnx_attention_gap("fuse_onnx_attention_nonpad.onnx", nonpad=True)
    onnx_attention_gap("fuse_onnx_attention_nonpad_3d.onnx", nonpad=True, three_d=True)
    # Negative graphs: file name = expected reason code.
    simple("skip_softmax-not-last-axis.onnx", axis=2)
    simple("skip_scale-not-constant.onnx", scale_input=True)
    simple("skip_intermediate-is-graph-output.onnx", scores_out=True)
    simple("skip_intermediate-has-other-consumers.onnx", extra_reader=True)
    simple("skip_mask-not-broadcastable.onnx", mask_rank5=True)
    simple("skip_dropout-in-training.onnx", dropout_training=True)
    simple("skip_k-transpose-unrecognized.onnx", bad_perm=True)
    simple("skip_mask-fill-not-negative.onnx", fill=0.0)
    simple("skip_mask-before-scale.onnx", mask_then_scale=True)
    simple("skip_softcap-unrecognized.onnx", bad_softcap=True)
    simple("skip_dtype-unsupported.onnx", dtype=T.DOUBLE)
    simple("skip_rank-unsupported.onnx", rank2=True)
    simple("skip_pv-order-unexpected.onnx", pv_swapped=True)
    simple("skip_score-op-unsupported.onnx", relu=True)
    onnx_attention("skip_causal-alignment-ambiguous.onnx", causal=1, kv_seq="T")
    onnx_attention("skip_qk-output-used.onnx", qk_out=True)
    more_negatives()
    ort_optimized_bert()


if __name__ == "__main__":
    main()
