"""One timed attention forward in ONNX Runtime's CPU EP, run by `cargo bench --bench
cpu_attention` in its own process so that its peak memory is its own.

usage: peers_cpu.py IMPL S THREADS [LIB [SECONDS]]
       peers_cpu.py ab S THREADS SECONDS LIB_A LIB_B
       peers_cpu.py decode HEADS SQ SKV D THREADS SECONDS LIB [LIB_B]
  IMPL: unfused   MatMul -> Mul -> Softmax -> MatMul graph (as ../shared/bench/peers_ort_cpu.py)
        mha       com.microsoft.MultiHeadAttention
        flash_op  com.flash.FlashAttention from LIB (libflash_ort.so)
        paired    all three in this one process, one iteration of each in turn for SECONDS
                  (default 20): the ratios of each round's times, taken at the same moments
        ab        the op from two builds of the library (before and after a change), one
                  iteration of each in turn: time A / time B per round (> 1: B is faster)
        decode    SQ new queries against SKV keys (HEADS heads, head size D): the op (from LIB,
                  and LIB_B when given) and the unfused graph in turn for SECONDS
Prints one JSON line: gflops (wall clock), cpu_gflops (flops per second of process CPU time,
all threads), seconds of the fastest iteration, iterations, peak RSS (MiB) and the RSS after imports (MiB); for `paired`, per-round ratios (median and quartiles) and median GFLOP/s. Fixed shape: batch 1, 8 heads, head size 64, fp32, non-causal.
Environment: FLASH_BENCH_MEM_LIMIT_GB caps the address space so that an oversized graph fails
with an allocation error instead of waking the OOM killer."""

import json
import os
import resource
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as TP
from onnx import helper

F = TP.FLOAT
B, H, D = 1, 8, 64


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def unfused_graph(io, out, d):
    """q, k, v → softmax(q·kᵀ/√d)·v as plain ONNX ops (4D, heads on axis 1)."""
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["ss"]),
        helper.make_node("Softmax", ["ss"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["o"]),
    ]
    return helper.make_graph(nodes, "g", io, out, [helper.make_tensor("scale", F, [], [d**-0.5])])


def unfused():
    io = [helper.make_tensor_value_info(n, F, ["B", H, "S", D]) for n in "qkv"]
    out = [helper.make_tensor_value_info("o", F, ["B", H, "S", D])]
    g = unfused_graph(io, out, D)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), "bnsd"


def mha():
    io = [helper.make_tensor_value_info(n, F, ["B", "S", H * D]) for n in "qkv"]
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft", num_heads=H)
    out = [helper.make_tensor_value_info("o", F, ["B", "S", H * D])]
    g = helper.make_graph([node], "g", io, out)
    ops = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(g, opset_imports=ops, ir_version=10), "bsh"


def flash_op():
    io = [helper.make_tensor_value_info(n, F, ["B", H, "S", D]) for n in "qkv"]
    node = helper.make_node("FlashAttention", ["q", "k", "v"], ["o"], domain="com.flash")
    out = [helper.make_tensor_value_info("o", F, ["B", H, "S", D])]
    g = helper.make_graph([node], "g", io, out)
    ops = [helper.make_opsetid("", 17), helper.make_opsetid("com.flash", 1)]
    return helper.make_model(g, opset_imports=ops, ir_version=9), "bnsd"


BUILDERS = {"unfused": unfused, "mha": mha, "flash_op": flash_op}


def session(impl, n, threads, lib, spin=True):
    """A warmed-up session of `impl` at sequence length `n`, and its inputs."""
    model, layout = BUILDERS[impl]()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if impl == "flash_op":
        so.register_custom_ops_library(lib)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    shape = (B, n, H * D) if layout == "bsh" else (B, H, n, D)
    rng = np.random.default_rng(0)
    feeds = {x: rng.standard_normal(shape, dtype=np.float32) for x in "qkv"}
    sess.run(None, feeds)  # warm-up: arena growth, thread pool start
    return sess, feeds


def spread(r):
    """Median and quartiles of per-round ratios."""
    return {"median": float(np.median(r)), "p25": float(np.percentile(r, 25)),
            "p75": float(np.percentile(r, 75))}


def in_turn(sessions, seconds):
    """One iteration of each (session, feeds) in turn for `seconds` (at least 5 rounds): the
    host's state (other tenants, clock) changes within seconds here, and a ratio of times taken
    moments apart cancels most of it. Each session has its own thread pool: their workers must
    not spin (see `session`), or the idle pools would take the cores from the one running.
    Returns each session's iteration times."""
    times = [[] for _ in sessions]
    start = time.perf_counter()
    while len(times[0]) < 5 or time.perf_counter() - start < seconds:
        for (sess, feeds), ts in zip(sessions, times):
            t = time.perf_counter()
            sess.run(None, feeds)
            ts.append(time.perf_counter() - t)
    return [np.array(ts) for ts in times]


def paired(n, threads, lib, seconds):
    """The op and both ORT peers at the same moments."""
    impls = ("flash_op", "unfused", "mha")
    times = in_turn([session(impl, n, threads, lib, spin=False) for impl in impls], seconds)
    t = dict(zip(impls, times))
    flops = 4.0 * B * H * n * n * D
    print(json.dumps({
        "impl": "paired", "s": n, "rounds": len(t["flash_op"]), "seconds": seconds,
        "op_vs_unfused": spread(t["unfused"] / t["flash_op"]),
        "op_vs_mha": spread(t["mha"] / t["flash_op"]),
        "median_gflops": {impl: flops / float(np.median(v)) / 1e9 for impl, v in t.items()},
        "peak_mib": peak_mib(), "ort": ort.__version__,
    }))


def ab(n, threads, seconds, lib_a, lib_b):
    """The op from two library files at the same moments: an A/B of a change that the host's
    drift does not swamp."""
    a, b = in_turn([session("flash_op", n, threads, lib, spin=False) for lib in (lib_a, lib_b)],
                   seconds)
    flops = 4.0 * B * H * n * n * D
    print(json.dumps({
        "impl": "ab", "s": n, "threads": threads, "rounds": len(a),
        "a_over_b": spread(a / b),
        "best_gflops": {"a": flops / a.min() / 1e9, "b": flops / b.min() / 1e9},
        "median_gflops": {"a": flops / float(np.median(a)) / 1e9,
                          "b": flops / float(np.median(b)) / 1e9},
    }))


def decode(heads, sq, skv, d, threads, seconds, libs):
    """Decoding shapes (a few new queries against a long past, as an LLM's generation step
    with the past passed as K/V): the op from each library and the unfused graph, in turn."""

    def model(impl):
        q = helper.make_tensor_value_info("q", F, [1, heads, sq, d])
        kv = [helper.make_tensor_value_info(n, F, [1, heads, skv, d]) for n in "kv"]
        out = [helper.make_tensor_value_info("o", F, [1, heads, sq, d])]
        if impl == "unfused":
            g = unfused_graph([q, *kv], out, d)
            return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
        node = helper.make_node("FlashAttention", ["q", "k", "v"], ["o"], domain="com.flash")
        g = helper.make_graph([node], "g", [q, *kv], out)
        ops = [helper.make_opsetid("", 17), helper.make_opsetid("com.flash", 1)]
        return helper.make_model(g, opset_imports=ops, ir_version=9)

    rng = np.random.default_rng(0)
    feeds = {"q": rng.standard_normal((1, heads, sq, d), dtype=np.float32),
             "k": rng.standard_normal((1, heads, skv, d), dtype=np.float32),
             "v": rng.standard_normal((1, heads, skv, d), dtype=np.float32)}
    sessions = []
    for lib in [None, *libs]:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if lib:
            so.register_custom_ops_library(lib)
        sess = ort.InferenceSession(model("op" if lib else "unfused").SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        sess.run(None, feeds)
        sessions.append((sess, feeds))
    times = in_turn(sessions, seconds)
    res = {"impl": "decode", "heads": heads, "sq": sq, "skv": skv, "d": d, "threads": threads,
           "rounds": len(times[0]), "us_best": {}, "us_median": {}}
    for name, t in zip(["unfused", *[f"op{i}" for i in range(len(libs))]], times):
        res["us_best"][name] = float(t.min() * 1e6)
        res["us_median"][name] = float(np.median(t) * 1e6)
        if name != "unfused":
            res[f"{name}_vs_unfused"] = spread(times[0] / t)
    print(json.dumps(res))


def main():
    impl, n, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    limit = os.environ.get("FLASH_BENCH_MEM_LIMIT_GB")
    if limit:
        cap = int(float(limit) * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    if impl == "ab":
        ab(n, threads, float(sys.argv[4]), sys.argv[5], sys.argv[6])
        return
    if impl == "decode":
        a = sys.argv
        decode(int(a[2]), int(a[3]), int(a[4]), int(a[5]), int(a[6]), float(a[7]), a[8:])
        return
    lib = sys.argv[4] if len(sys.argv) > 4 else None
    if impl == "paired":
        paired(n, threads, lib, float(sys.argv[5]) if len(sys.argv) > 5 else 20.0)
        return
    base = peak_mib()
    sess, feeds = session(impl, n, threads, lib)
    times = []
    cpu0 = time.process_time()
    start = time.perf_counter()
    while len(times) < 2 or (time.perf_counter() - start < 1.5 and len(times) < 50):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    cpu = (time.process_time() - cpu0) / len(times)
    sec = min(times)  # the iteration least disturbed by other jobs on a shared machine
    flops = 4.0 * B * H * n * n * D
    print(json.dumps({
        "impl": impl, "s": n, "gflops": flops / sec / 1e9, "secs": sec, "iters": len(times),
        "cpu_gflops": flops / cpu / 1e9,
        "peak_mib": peak_mib(), "base_mib": base, "ort": ort.__version__,
    }))


if __name__ == "__main__":
    main()
