# PyTorch SDPA peers (flash = FlashAttention-2, cudnn) on the grid that benches/cuda_bench.rs
# measures, for side-by-side ratios in one run. Derived from shared/bench/peers_torch_sdpa.py and
# peers_torch_decode.py (same shapes and timing method), restricted to S in {1k, 4k, 16k} and the
# two backends that set the bar. One JSON object per line.
import json, os, sys
import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend


def bench(fn, iters=20, warm=3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); e.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2] / 1e3


BACKENDS = [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)]
ONLY = os.environ.get("PEERS", "")  # "grid" or "decode": one part only
SEQS = [int(x) for x in os.environ.get("SEQS", "1024,4096,16384").split(",")]  # grid S values
DTYPES = [getattr(torch, x) for x in os.environ.get("PEER_DTYPES", "float16,bfloat16").split(",")]
print(json.dumps({"kind": "device", "name": torch.cuda.get_device_name(0), "torch": torch.__version__}))
for dtype in DTYPES:
    for d in [64, 128]:
        for causal in [False, True] if ONLY != "decode" else []:
            for n in SEQS:
                b = 16384 // n; h = 2048 // d
                q = torch.randn(b, h, n, d, device="cuda", dtype=dtype)
                k = torch.randn_like(q); v = torch.randn_like(q)
                flops = 4 * b * h * n * n * d / (2 if causal else 1)
                row = {"kind": "grid", "dtype": str(dtype).split(".")[1], "d": d, "causal": causal, "n": n}
                for name, be in BACKENDS:
                    try:
                        with sdpa_kernel([be]):
                            t = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
                        row[name] = round(flops / t / 1e12, 1)
                    except Exception as ex:
                        row[name] = "ERR " + str(ex)[:60]
                print(json.dumps(row)); sys.stdout.flush()
    H, Hk, D = 32, 8, 128
    for B in [1, 8] if ONLY != "grid" else []:
        for T in [8192, 65536]:
            q = torch.randn(B, H, 1, D, device="cuda", dtype=dtype)
            k = torch.randn(B, Hk, T, D, device="cuda", dtype=dtype); v = torch.randn_like(k)
            byts = 2 * k.numel() * 2
            row = {"kind": "decode", "dtype": str(dtype).split(".")[1], "B": B, "Skv": T}
            for name, be in BACKENDS:
                try:
                    with sdpa_kernel([be]):
                        t = bench(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), iters=50, warm=5)
                    row[name] = round(byts / t / 1e9)
                except Exception as ex:
                    row[name] = "ERR " + str(ex)[:50]
            print(json.dumps(row)); sys.stdout.flush()
x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
print(json.dumps({"kind": "copy", "GBps": round(2 * x.numel() / bench(lambda: y.copy_(x), 10) / 1e9)}))
