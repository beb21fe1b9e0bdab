"""Attention forward on the GPU, side by side in one run: com.flash.FlashAttention in
onnxruntime-gpu's CUDA EP against ORT's com.microsoft.MultiHeadAttention and PyTorch SDPA (flash
and cuDNN backends), I/O bound to device memory. Prints one JSON row per shape with TFLOP/s and
ratios, and decode rows (Sq = 1) as GB/s of K/V read.

    FLASH_ORT_LIB=target/release/libflash_ort.so python bench/gpu_ort_bench.py [OUT.json]
"""

import json
import os
import sys
import time

import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import TensorProto as TP
from onnx import helper
from torch.nn.attention import SDPBackend, sdpa_kernel

try:
    ort.preload_dlls()
except Exception:
    pass

LIB = os.environ.get("FLASH_ORT_LIB", "target/release/libflash_ort.so")
ONNX_T = {torch.float16: TP.FLOAT16, torch.bfloat16: TP.BFLOAT16}


def flash_model(t, hq, hkv, d, causal):
    io = [helper.make_tensor_value_info("q", t, ["B", hq, "S", d])] + [
        helper.make_tensor_value_info(n, t, ["B", hkv, "T", d]) for n in "kv"
    ]
    node = helper.make_node("FlashAttention", ["q", "k", "v"], ["o"], domain="com.flash", is_causal=int(causal))
    g = helper.make_graph([node], "g", io, [helper.make_tensor_value_info("o", t, ["B", hq, "S", d])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.flash", 1)], ir_version=10)


def mha_model(t, h, d, causal):
    io = [helper.make_tensor_value_info(n, t, ["B", "S", h * d]) for n in "qkv"]
    attrs = {"num_heads": h}
    if causal:
        attrs["unidirectional"] = 1
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft", **attrs)
    g = helper.make_graph([node], "g", io, [helper.make_tensor_value_info("o", t, ["B", "S", h * d])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=10)


def ort_time(model, tensors, out, iters, with_lib):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if with_lib:
        so.register_custom_ops_library(LIB)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CUDAExecutionProvider"])
    bind = sess.io_binding()
    et = {torch.float16: "float16", torch.bfloat16: "bfloat16"}[out.dtype]
    for name, x in tensors.items():
        bind.bind_input(name, "cuda", 0, et if et == "float16" else TP.BFLOAT16, list(x.shape), x.data_ptr())
    bind.bind_output("o", "cuda", 0, et if et == "float16" else TP.BFLOAT16, list(out.shape), out.data_ptr())
    return timed(lambda: sess.run_with_iobinding(bind), iters)


def timed(fn, iters):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    s = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - s) / iters


def sdpa_time(q, k, v, causal, backend, iters):
    gqa = q.shape[1] != k.shape[1]
    with sdpa_kernel([backend]):
        return timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa), iters)


def safe(fn):
    try:
        return fn()
    except Exception as e:  # a peer that cannot run a shape is reported, not fatal
        return "ERR " + str(e).replace("\n", " ")[:100]


def main():
    rows = []
    out_path = sys.argv[1] if len(sys.argv) > 1 else "gpu_ort_bench.json"
    print("device", torch.cuda.get_device_name(), "ort", ort.__version__, "torch", torch.__version__, flush=True)
    for dtype in (torch.float16, torch.bfloat16):
        for d in (64, 128):
            for causal in (False, True):
                for n in (1024, 4096, 16384):
                    b, h = max(1, 16384 // n), 2048 // d
                    flops = 4 * b * h * n * n * d / (2 if causal else 1)
                    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype) for _ in range(3))
                    o = torch.empty_like(q)
                    iters = 10 if n >= 16384 else 20
                    row = {"dtype": str(dtype).split(".")[1], "d": d, "causal": causal, "n": n, "b": b, "h": h}
                    t = safe(lambda: ort_time(flash_model(ONNX_T[dtype], h, h, d, causal), {"q": q, "k": k, "v": v}, o, iters, True))
                    row["flash_ort"] = round(flops / t / 1e12, 1) if isinstance(t, float) else t
                    qs, ks, vs = (x.transpose(1, 2).reshape(b, n, h * d).contiguous() for x in (q, k, v))
                    os_ = torch.empty_like(qs)
                    t = safe(lambda: ort_time(mha_model(ONNX_T[dtype], h, d, causal), {"q": qs, "k": ks, "v": vs}, os_, iters, False))
                    row["ort_mha"] = round(flops / t / 1e12, 1) if isinstance(t, float) else t
                    for name, be in (("torch_flash", SDPBackend.FLASH_ATTENTION), ("torch_cudnn", SDPBackend.CUDNN_ATTENTION)):
                        t = safe(lambda: sdpa_time(q, k, v, causal, be, iters))
                        row[name] = round(flops / t / 1e12, 1) if isinstance(t, float) else t
                    for peer in ("torch_flash", "torch_cudnn", "ort_mha"):
                        if isinstance(row["flash_ort"], float) and isinstance(row[peer], float):
                            row[f"vs_{peer}"] = round(row["flash_ort"] / row[peer], 2)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    del q, k, v, o, qs, ks, vs, os_
    # Decode: one query token, 32 query heads over 8 KV heads, D = 128, fp16.
    for b in (1, 8):
        for skv in (8192, 65536):
            hq, hkv, d = 32, 8, 128
            q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.float16)
            k, v = (torch.randn(b, hkv, skv, d, device="cuda", dtype=torch.float16) for _ in range(2))
            o = torch.empty_like(q)
            nbytes = 2 * b * hkv * skv * d * 2
            row = {"decode": True, "b": b, "skv": skv, "hq": hq, "hkv": hkv, "d": d}
            t = safe(lambda: ort_time(flash_model(TP.FLOAT16, hq, hkv, d, False), {"q": q, "k": k, "v": v}, o, 50, True))
            row["flash_ort_GBps"] = round(nbytes / t / 1e9) if isinstance(t, float) else t
            for name, be in (("torch_flash", SDPBackend.FLASH_ATTENTION), ("torch_cudnn", SDPBackend.CUDNN_ATTENTION)):
                t = safe(lambda: sdpa_time(q, k, v, False, be, 50))
                row[f"{name}_GBps"] = round(nbytes / t / 1e9) if isinstance(t, float) else t
            if isinstance(row["flash_ort_GBps"], int) and isinstance(row["torch_flash_GBps"], int):
                row["vs_torch_flash"] = round(row["flash_ort_GBps"] / row["torch_flash_GBps"], 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
    json.dump(rows, open(out_path, "w"), indent=0)


if __name__ == "__main__":
    main()
