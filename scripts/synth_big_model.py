"""Writes a synthetic transformer encoder of N layers whose weights live in one external-data
file, to measure `flash-ort fuse` on big models (issue 3: 200 layers, 2 GB in under 2 s, memory
independent of the weights' size).

Usage: .venv/bin/python scripts/synth_big_model.py OUT_DIR [--layers 200] [--hidden 512] [--dense]
Writes OUT_DIR/model.onnx and OUT_DIR/weights.bin. Each layer: Q/K/V/O projections (hidden²) and a
4×hidden MLP, HF-eager attention (BSHD→BHDS K transpose, Div(√d), additive padding mask, Softmax,
MatMul). By default weights.bin is a sparse file of the right size (fuse never reads it); --dense
writes every byte (pseudo-random), for running the model too.
"""

import argparse
import os

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--layers", type=int, default=200)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dense", action="store_true")
    a = ap.parse_args()
    os.makedirs(a.out_dir, exist_ok=True)
    hid, nh = a.hidden, a.heads
    d = hid // nh
    nodes, inits, offset = [], [], 0
    k = 0

    def name(base):
        nonlocal k
        k += 1
        return f"{base}_{k}"

    def op(o, ins, **kw):
        out = name(o.lower())
        nodes.append(h.make_node(o, ins, [out], name=name(o), **kw))
        return out

    def weight(shape):
        nonlocal offset
        n = name("w")
        t = onnx.TensorProto(name=n, data_type=T.FLOAT, dims=list(shape))
        length = int(np.prod(shape)) * 4
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, val in (("location", "weights.bin"), ("offset", str(offset)), ("length", str(length))):
            e = t.external_data.add()
            e.key, e.value = key, val
        offset += length
        inits.append(t)
        return n

    def const(vals, dtype):
        n = name("c")
        inits.append(onnx.numpy_helper.from_array(np.asarray(vals, dtype=dtype), n))
        return n

    x = "x"
    mask = op("Unsqueeze", ["attention_mask", const([1, 2], np.int64)])
    mask = op("Mul", [op("Sub", [const(1.0, np.float32), op("Cast", [mask], to=T.FLOAT)]), const(-1e4, np.float32)])
    split = const([0, 0, nh, d], np.int64)
    merge_shape = const([0, 0, hid], np.int64)
    for _ in range(a.layers):
        def proj(perm):
            y = op("Reshape", [op("MatMul", [x, weight((hid, hid))]), split])
            return op("Transpose", [y], perm=perm)

        q, kt, v = proj([0, 2, 1, 3]), proj([0, 2, 3, 1]), proj([0, 2, 1, 3])
        s = op("Add", [op("Div", [op("MatMul", [q, kt]), const(np.sqrt(d), np.float32)]), mask])
        ctx = op("MatMul", [op("Softmax", [s], axis=-1), v])
        ctx = op("Reshape", [op("Transpose", [ctx], perm=[0, 2, 1, 3]), merge_shape])
        x = op("Add", [x, op("MatMul", [ctx, weight((hid, hid))])])
        mlp = op("MatMul", [op("Relu", [op("MatMul", [x, weight((hid, 4 * hid))])]), weight((4 * hid, hid))])
        x = op("Add", [x, mlp])
    nodes.append(h.make_node("Identity", [x], ["y"], name="out"))
    g = h.make_graph(
        nodes,
        "synthetic",
        [h.make_tensor_value_info("x", T.FLOAT, ["batch", "seq", hid]),
         h.make_tensor_value_info("attention_mask", T.INT64, ["batch", "seq"])],
        [h.make_tensor_value_info("y", T.FLOAT, ["batch", "seq", hid])],
        inits,
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    with open(os.path.join(a.out_dir, "model.onnx"), "wb") as f:
        f.write(m.SerializeToString())
    path = os.path.join(a.out_dir, "weights.bin")
    with open(path, "wb") as f:
        if a.dense:
            rng = np.random.default_rng(0)
            left = offset
            while left:
                n = min(left, 64 << 20)
                f.write((rng.standard_normal(n // 4).astype(np.float32) * 0.02).tobytes())
                left -= n
        else:
            f.truncate(offset)
    print(f"{a.layers} layers, {len(nodes)} nodes, weights {offset / 1e9:.2f} GB in {path}")


if __name__ == "__main__":
    main()
