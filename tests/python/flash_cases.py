"""Builders shared by the Python tests: a `com.flash.FlashAttention` model, the same attention as
an unfused ONNX graph (MatMul/Mul/Tanh/Where/Softmax/MatMul...), an fp64 numpy reference and a
naive computation rounded to a low-precision dtype (for FlashAttention's error criterion)."""

import os
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]

DTYPES = {
    "float32": (np.float32, TP.FLOAT),
    "float16": (np.float16, TP.FLOAT16),
    "bfloat16": (ml_dtypes.bfloat16, TP.BFLOAT16),
}


def library_path():
    """The operator library: FLASH_ORT_LIB, else the release build, else the debug build."""
    env = os.environ.get("FLASH_ORT_LIB")
    if env:
        return env
    for profile in ("release", "debug"):
        p = ROOT / "target" / profile / "libflash_ort.so"
        if p.exists():
            return str(p)
    raise FileNotFoundError("libflash_ort.so not found: run `cargo build --release` first")


@dataclass
class Case:
    b: int = 1
    hq: int = 2
    hkv: int = 2
    sq: int = 4
    skv: int = 4
    d: int = 8
    dv: int = 8
    past: int = 0
    layout: str = "4d"  # or "3d"
    dtype: str = "float32"
    is_causal: int = 0
    scale: float | None = None
    softcap: float = 0.0
    window_left: int = -1
    window_right: int = -1
    mask: str | None = None  # None, "bool", "float", "float32" (f32 mask with low-precision Q)
    mask_shape: tuple = ()  # broadcast shape of the mask (rank 1-4)
    nonpad: bool = False
    want_present: bool = False
    seed: int = 0
    inputs: dict = field(default_factory=dict)

    @property
    def total(self):
        return self.past + self.skv

    def attrs(self):
        a = {}
        if self.is_causal:
            a["is_causal"] = 1
        if self.scale is not None:
            a["scale"] = float(self.scale)
        if self.layout == "3d":
            a["q_num_heads"] = self.hq
            a["kv_num_heads"] = self.hkv
        if self.softcap:
            a["softcap"] = float(self.softcap)
        if self.window_left != -1:
            a["window_left"] = self.window_left
        if self.window_right != -1:
            a["window_right"] = self.window_right
        return a

    def make_inputs(self):
        """Random inputs in the op's layout (4D tensors are [B,H,S,D], 3D are [B,S,H*D])."""
        rng = np.random.default_rng(self.seed)
        npt = DTYPES[self.dtype][0]
        q = rng.standard_normal((self.b, self.hq, self.sq, self.d))
        k = rng.standard_normal((self.b, self.hkv, self.skv, self.d))
        v = rng.standard_normal((self.b, self.hkv, self.skv, self.dv))
        ins = {}
        if self.layout == "3d":
            ins["Q"] = q.transpose(0, 2, 1, 3).reshape(self.b, self.sq, -1)
            ins["K"] = k.transpose(0, 2, 1, 3).reshape(self.b, self.skv, -1)
            ins["V"] = v.transpose(0, 2, 1, 3).reshape(self.b, self.skv, -1)
        else:
            ins["Q"], ins["K"], ins["V"] = q, k, v
        for n in ("Q", "K", "V"):
            ins[n] = ins[n].astype(npt)
        if self.mask:
            shape = self.mask_shape or (self.b, self.hq, self.sq, self.total)
            if self.mask == "bool":
                m = rng.random(shape) > 0.3
            else:
                m = rng.standard_normal(shape) * 2.0
                m[rng.random(shape) < 0.2] = -np.inf
                m = m.astype(np.float32 if self.mask == "float32" else npt)
            ins["attn_mask"] = m
        if self.past:
            ins["past_key"] = rng.standard_normal((self.b, self.hkv, self.past, self.d)).astype(npt)
            ins["past_value"] = rng.standard_normal((self.b, self.hkv, self.past, self.dv)).astype(npt)
        if self.nonpad:
            ins["nonpad_kv_seqlen"] = rng.integers(0, self.total + 1, size=(self.b,)).astype(np.int64)
        self.inputs = ins
        return ins


INPUT_ORDER = ["Q", "K", "V", "attn_mask", "past_key", "past_value", "nonpad_kv_seqlen"]


def _vi(name, arr):
    t = TP.BOOL if arr.dtype == np.bool_ else helper.np_dtype_to_tensor_dtype(arr.dtype)
    return helper.make_tensor_value_info(name, t, list(arr.shape))


def feeds(inputs):
    """Session feeds: bfloat16 arrays travel as float32 (the bf16 model casts them back)."""
    return {k: (v.astype(np.float32) if v.dtype == ml_dtypes.bfloat16 else v) for k, v in inputs.items()}


def flash_model(case: Case, inputs: dict, symbolic=False):
    """One FlashAttention node over the inputs present in `inputs`. ORT's Python API cannot feed
    bfloat16 arrays, so a bfloat16 model takes float32 graph inputs and Casts them (and Y) around
    the node; the operator itself still sees bfloat16 tensors."""
    bf16 = case.dtype == "bfloat16"
    nodes = []
    names = []
    for n in INPUT_ORDER:
        if n not in inputs:
            names.append("")
        elif bf16 and inputs[n].dtype == ml_dtypes.bfloat16:
            nodes.append(helper.make_node("Cast", [n], [n + "_bf16"], to=TP.BFLOAT16))
            names.append(n + "_bf16")
        else:
            names.append(n)
    while names and names[-1] == "":
        names.pop()
    outs = ["Y", "present_key", "present_value"] if case.want_present else ["Y"]
    node_outs = [o + "_bf16" for o in outs] if bf16 else outs
    nodes.append(helper.make_node("FlashAttention", names, node_outs, domain="com.flash", **case.attrs()))
    if bf16:
        nodes += [helper.make_node("Cast", [o + "_bf16"], [o], to=TP.FLOAT) for o in outs]
    graph_inputs = []
    for n in INPUT_ORDER:
        if n in inputs:
            arr = feeds({n: inputs[n]})[n]
            vi = _vi(n, arr)
            if symbolic:
                vi = helper.make_tensor_value_info(n, vi.type.tensor_type.elem_type, None)
            graph_inputs.append(vi)
    out_type = TP.FLOAT if bf16 else DTYPES[case.dtype][1]
    graph_outputs = [helper.make_tensor_value_info(o, out_type, None) for o in outs]
    g = helper.make_graph(nodes, "flash", graph_inputs, graph_outputs)
    return helper.make_model(
        g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.flash", 1)], ir_version=9
    )


def visibility(case: Case, nonpad=None):
    """Bool [B, 1, Sq, T]: causal/window/padding visibility (bottom-right aligned)."""
    t = case.total
    i = np.arange(case.sq)[:, None] + (t - case.sq)
    j = np.arange(t)[None, :]
    vis = np.ones((case.sq, t), bool)
    wr = 0 if case.is_causal else case.window_right
    if wr >= 0:
        vis &= j <= i + wr
    if case.window_left >= 0:
        vis &= j >= i - case.window_left
    vis = np.broadcast_to(vis, (case.b, 1, case.sq, t)).copy()
    if nonpad is not None:
        for b in range(case.b):
            vis[b, :, :, nonpad[b] :] = False
    return vis


def to_bhsd(case, x, heads, dim):
    if case.layout == "3d":
        return x.reshape(case.b, x.shape[1], heads, dim).transpose(0, 2, 1, 3)
    return x


def reference(case: Case, inputs: dict, dtype=np.float64, rounding=None):
    """Attention per DESIGN.md in `dtype`; `rounding` rounds intermediates (naive low precision)."""
    r = rounding or (lambda x: x)
    q = to_bhsd(case, inputs["Q"].astype(dtype), case.hq, case.d)
    k = to_bhsd(case, inputs["K"].astype(dtype), case.hkv, case.d)
    v = to_bhsd(case, inputs["V"].astype(dtype), case.hkv, case.dv)
    if case.past:
        k = np.concatenate([inputs["past_key"].astype(dtype), k], axis=2)
        v = np.concatenate([inputs["past_value"].astype(dtype), v], axis=2)
    g = case.hq // case.hkv
    k = np.repeat(k, g, axis=1)
    v = np.repeat(v, g, axis=1)
    scale = case.scale if case.scale is not None else 1.0 / np.sqrt(case.d)
    s = r(r(q @ k.transpose(0, 1, 3, 2)) * scale)
    if case.softcap:
        s = r(case.softcap * np.tanh(s / case.softcap))
    vis = visibility(case, inputs.get("nonpad_kv_seqlen"))
    vis = np.broadcast_to(vis, s.shape)
    if "attn_mask" in inputs:
        m = inputs["attn_mask"]
        if m.dtype == np.bool_:
            vis = vis & np.broadcast_to(m, s.shape)
        else:
            s = r(s + m.astype(dtype))
            vis = vis & np.isfinite(np.broadcast_to(m.astype(np.float64), s.shape))
    s = np.where(vis, s, -np.inf)
    mx = np.max(s, axis=-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0)
    e = np.where(vis, np.exp(s - mx), 0)
    den = e.sum(-1, keepdims=True)
    p = r(np.where(den > 0, e / np.where(den > 0, den, 1), 0))
    y = r(p @ v)
    if case.layout == "3d":
        y = y.transpose(0, 2, 1, 3).reshape(case.b, case.sq, -1)
    return y


def rounded_reference(case: Case, inputs: dict):
    """Naive attention with every intermediate rounded to the case's dtype."""
    npt = DTYPES[case.dtype][0]
    return reference(case, inputs, np.float64, rounding=lambda x: x.astype(npt).astype(np.float64))


def unfused_model(case: Case, inputs: dict):
    """The same attention as an unfused ONNX graph (fp32/fp16): the fusion's ground truth in ORT.

    Causal/window/padding visibility and the user's mask enter as one boolean Where; a NaN guard
    after Softmax turns fully masked rows into zeros, as the fused op does."""
    et = DTYPES[case.dtype][1]
    nodes, inits = [], []
    gin = [_vi(n, inputs[n]) for n in INPUT_ORDER if n in inputs and n != "nonpad_kv_seqlen"]

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def to4d(x, heads, dim, tag):
        if case.layout == "3d":
            nodes.append(helper.make_node("Reshape", [x, const(f"shp_{tag}", np.array([case.b, -1, heads, dim], np.int64))], [f"{tag}_r"]))
            nodes.append(helper.make_node("Transpose", [f"{tag}_r"], [f"{tag}_4"], perm=[0, 2, 1, 3]))
            return f"{tag}_4"
        return x

    q, k, v = to4d("Q", case.hq, case.d, "q"), to4d("K", case.hkv, case.d, "k"), to4d("V", case.hkv, case.dv, "v")
    if case.past:
        nodes.append(helper.make_node("Concat", ["past_key", k], ["k_all"], axis=2))
        nodes.append(helper.make_node("Concat", ["past_value", v], ["v_all"], axis=2))
        k, v = "k_all", "v_all"
    g = case.hq // case.hkv
    if g > 1:
        for x, dim in ((k, case.d), (v, case.dv)):
            nodes.append(helper.make_node("Unsqueeze", [x, const(f"ax_{x}", np.array([2], np.int64))], [f"{x}_u"]))
            shp = np.array([case.b, case.hkv, g, case.total, dim], np.int64)
            nodes.append(helper.make_node("Expand", [f"{x}_u", const(f"ex_{x}", shp)], [f"{x}_e"]))
            nodes.append(helper.make_node("Reshape", [f"{x}_e", const(f"rs_{x}", np.array([case.b, case.hq, case.total, dim], np.int64))], [f"{x}_g"]))
        k, v = f"{k}_g", f"{v}_g"
    npt = DTYPES[case.dtype][0]
    scale = case.scale if case.scale is not None else 1.0 / np.sqrt(case.d)
    nodes.append(helper.make_node("Transpose", [k], ["kt"], perm=[0, 1, 3, 2]))
    nodes.append(helper.make_node("MatMul", [q, "kt"], ["qk"]))
    nodes.append(helper.make_node("Mul", ["qk", const("scale", np.array(scale, npt))], ["s0"]))
    s = "s0"
    if case.softcap:
        nodes.append(helper.make_node("Div", [s, const("cap", np.array(case.softcap, npt))], ["s_d"]))
        nodes.append(helper.make_node("Tanh", ["s_d"], ["s_t"]))
        nodes.append(helper.make_node("Mul", ["s_t", "cap"], ["s1"]))
        s = "s1"
    vis = visibility(case, inputs.get("nonpad_kv_seqlen"))
    if "attn_mask" in inputs:
        m = inputs["attn_mask"]
        if m.dtype == np.bool_:
            nodes.append(helper.make_node("And", ["attn_mask", const("vis", vis)], ["vis_all"]))
        else:
            mname = "attn_mask"
            if m.dtype != npt:
                nodes.append(helper.make_node("Cast", ["attn_mask"], ["mask_c"], to=et))
                mname = "mask_c"
            nodes.append(helper.make_node("Add", [s, mname], ["s_m"]))
            s = "s_m"
            # IsInf takes float16 only from opset 20: test the mask's float32 copy.
            nodes.append(helper.make_node("Cast", ["attn_mask"], ["mask_f32"], to=TP.FLOAT))
            nodes.append(helper.make_node("IsInf", ["mask_f32"], ["m_inf"], detect_positive=0))
            nodes.append(helper.make_node("Not", ["m_inf"], ["m_ok"]))
            nodes.append(helper.make_node("And", ["m_ok", const("vis", vis)], ["vis_all"]))
        visname = "vis_all"
    else:
        visname = const("vis", vis)
    nodes.append(helper.make_node("Where", [visname, s, const("neg_inf", np.array(-np.inf, npt))], ["s_w"]))
    nodes.append(helper.make_node("Softmax", ["s_w"], ["p0"], axis=-1))
    nodes.append(helper.make_node("IsNaN", ["p0"], ["p_nan"]))
    nodes.append(helper.make_node("Where", ["p_nan", const("zero", np.array(0, npt)), "p0"], ["p"]))
    nodes.append(helper.make_node("MatMul", ["p", v], ["y4"]))
    if case.layout == "3d":
        nodes.append(helper.make_node("Transpose", ["y4"], ["y_t"], perm=[0, 2, 1, 3]))
        nodes.append(helper.make_node("Reshape", ["y_t", const("shp_y", np.array([case.b, case.sq, -1], np.int64))], ["Y"]))
    else:
        nodes.append(helper.make_node("Identity", ["y4"], ["Y"]))
    graph = helper.make_graph(nodes, "unfused", gin, [helper.make_tensor_value_info("Y", et, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)

    return model
