#!/usr/bin/env python3
"""Reliability of a fused model (com.flash.FlashAttention nodes) inside one ONNX Runtime session.

Checks, each recorded in the JSON with its evidence:
- `bad_inputs`: run-time inputs that are wrong (dtype, rank, a mask whose length or batch differs
  from the ids, a missing or unknown input, a sequence longer than the position table) each give
  an error, and afterwards the session still returns exactly the output it gave before.
- `threads`: N threads (default 8) calling Run concurrently on the one session, each result
  identical to the single-threaded result for the same inputs.
- `cuda_graph` (CUDA only): a session with `enable_cuda_graph` (shapes fixed by free-dimension
  overrides, I/O bound to device buffers) gives the plain session's output, and again after new
  input values are written into the same buffers. ORT refuses graph capture when a node of the
  model runs on the CPU; that is reported as the reason, not as a pass.
- `two_gpu` (CUDA only): two sessions of the model in this one process, on device 0 and device 1,
  I/O bound to each device's memory: each gives the output the device-0 session gives alone, run
  one after the other and then from two threads at once (both GPUs busy together); this process's
  memory on device 1 grows when its session is made (the work really is there). With one GPU
  visible the check is skipped (`ran: false`), not failed.
- `soak`: R runs (default 10 000) cycling over a fixed set of (batch, sequence) shapes in random
  order, every sampled output finite and identical to the first output of its shape; device
  memory (NVML: this process's, else device-wide) and host RSS sampled along the way must stay
  flat over the second half of the runs (first/last figures and the fitted slope per 10 000 runs
  are recorded). On CUDA the outputs stay in device memory (io_binding) and only the sampled ones
  are copied back, so the soak measures the model, not copies of its logits.

    python tests/e2e/reliability.py --model FUSED.onnx [--provider cuda|cpu] [--library SO]
        [--checks bad_inputs,threads,cuda_graph,two_gpu,soak] [--runs 10000] [--seqs 8,32,128,512]
        [--batches 1,4] [--out reliability.json] [--label NAME]

Exit status 0 when every check that ran passed, 1 otherwise, 2 on an error.
The op-level versions of these checks (one FlashAttention node: bad shapes inside the op, 8 threads,
CUDA graph, two GPUs) are in tests/gpu/test_op_cuda_ort.py; this script adds the whole-model view.
scripts/two_gpu.sh runs `two_gpu` alone on a two-GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
MIB = 2 ** 20


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# model facts
# ---------------------------------------------------------------------------------------------

class ModelFacts:
    """What the checks need to feed the model: input names and dtypes, vocab size, position table."""

    def __init__(self, path: str):
        import onnx

        m = onnx.load(path, load_external_data=False)
        inits = {t.name: list(t.dims) for t in m.graph.initializer}
        init_names = set(inits)
        self.inputs = [(i.name, i.type.tensor_type.elem_type) for i in m.graph.input if i.name not in init_names]
        self.names = [n for n, _ in self.inputs]
        self.flash_nodes = sum(1 for n in m.graph.node if n.domain == "com.flash")
        self.vocab = None
        self.max_positions = None
        for n in m.graph.node:
            if n.op_type == "Gather" and len(n.input) > 1 and n.input[0] in inits:
                dims = inits[n.input[0]]
                if n.input[1] == "input_ids" and self.vocab is None:
                    self.vocab = dims[0]
                elif "position" in n.input[0].lower() or "wpe" in n.input[0].lower():
                    self.max_positions = dims[0]
        self.vocab = self.vocab or 100

    def feeds(self, batch: int, seq: int, seed: int = 0) -> dict:
        rng = np.random.default_rng(seed)
        out = {}
        for name in self.names:
            if name == "input_ids":
                out[name] = rng.integers(0, self.vocab, size=(batch, seq), dtype=np.int64)
            elif name == "attention_mask":
                # Right padding on every other row, so the mask matters.
                m = np.ones((batch, seq), dtype=np.int64)
                for r in range(1, batch, 2):
                    m[r, max(1, seq - seq // 3):] = 0
                out[name] = m
            elif name == "token_type_ids":
                out[name] = np.zeros((batch, seq), dtype=np.int64)
            elif name == "position_ids":
                out[name] = np.tile(np.arange(seq, dtype=np.int64), (batch, 1))
            else:
                raise ValueError(f"input {name!r}: no rule to generate it")
        return out


def make_session(path, provider, library, cuda_opts=None, free_dims=None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4  # the bad-input cases make ORT log every error they provoke
    if library:
        so.register_custom_ops_library(library)
    for name, value in (free_dims or {}).items():
        so.add_free_dimension_override_by_name(name, value)
    if provider == "cuda":
        providers = [("CUDAExecutionProvider", dict(cuda_opts or {})), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    return ort.InferenceSession(path, so, providers=providers)


class Memory:
    """Device memory in use (NVML, device-wide; else torch) and this process's RSS."""

    def __init__(self, provider):
        self.gpu = None
        if provider != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(0)

            def own():
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
                    if p.pid == os.getpid() and isinstance(p.usedGpuMemory, int):
                        return int(p.usedGpuMemory)
                return None

            # This process's usage where NVML lists it (the session exists, so its CUDA context
            # does): other work on the GPU then cannot look like a leak. Else device-wide.
            if own() is not None:
                self.gpu, self.how = own, "nvml-process"
            else:
                self.gpu, self.how = (lambda: int(pynvml.nvmlDeviceGetMemoryInfo(h).used)), "nvml-device"
        except Exception:
            try:
                import torch

                self.gpu = lambda: int(torch.cuda.mem_get_info(0)[1] - torch.cuda.mem_get_info(0)[0])
                self.how = "torch.cuda.mem_get_info"
            except Exception:
                self.gpu, self.how = None, "none"

    @staticmethod
    def rss() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------

def check_bad_inputs(sess, facts: ModelFacts, a) -> dict:
    good = facts.feeds(2, 24, seed=1)
    want = sess.run(None, good)[0]
    cases = {}
    ids = good["input_ids"]

    def case(name, feeds):
        rec = {}
        try:
            out = sess.run(None, feeds)
            rec["raised"] = False
            rec["result"] = f"returned shape {list(out[0].shape)}"
        except Exception as e:
            rec["raised"] = True
            rec["error"] = str(e).replace("\n", " ")[:300]
        # The session must still give exactly what it gave before.
        after = sess.run(None, good)[0]
        rec["session_still_exact"] = bool(np.array_equal(after, want))
        cases[name] = rec

    case("input_ids float32", {**good, "input_ids": ids.astype(np.float32)})
    case("input_ids int32", {**good, "input_ids": ids.astype(np.int32)})
    case("input_ids rank 1", {**good, "input_ids": ids[0]})
    case("input_ids rank 3", {**good, "input_ids": ids[:, :, None]})
    if "attention_mask" in facts.names:
        m = good["attention_mask"]
        case("attention_mask longer than input_ids", {**good, "attention_mask": np.concatenate([m, m[:, :5]], 1)})
        case("attention_mask shorter than input_ids", {**good, "attention_mask": m[:, :-5]})
        case("attention_mask batch differs", {**good, "attention_mask": m[:1]})
        case("attention_mask float32", {**good, "attention_mask": m.astype(np.float32)})
    case("missing input", {k: v for k, v in good.items() if k != facts.names[-1]})
    case("unknown input name", {**good, "not_an_input": ids})
    if facts.max_positions:
        s = facts.max_positions + 16
        case(f"sequence {s} > position table {facts.max_positions}", facts.feeds(1, s, seed=3))
    # ORT itself must reject wrong dtypes, ranks and names. A mask whose length or batch differs
    # from the ids reaches the graph: the model may slice it (HF code does) or fail in some node;
    # either is acceptable, a crash or a session that changed afterwards is not. A sequence past
    # a learned position table must fail (silence would mean reading past the table).
    must_raise = [k for k in cases if k.startswith(("input_ids", "missing", "unknown", "sequence ")) or k.endswith("float32")]
    for k, c in cases.items():
        c["must_raise"] = k in must_raise
    ok = all(cases[k]["raised"] for k in must_raise) and all(c["session_still_exact"] for c in cases.values())
    return {"ok": ok, "cases": cases}


def check_threads(sess, facts: ModelFacts, a) -> dict:
    feeds = facts.feeds(2, min(128, a.max_seq), seed=2)
    want = sess.run(None, feeds)[0]
    got, errors = [], []
    lock = threading.Lock()

    def worker():
        try:
            for _ in range(a.thread_runs):
                y = sess.run(None, feeds)[0]
                with lock:
                    got.append(y)
        except Exception as e:
            errors.append(str(e)[:300])

    ts = [threading.Thread(target=worker) for _ in range(a.threads)]
    t0 = time.time()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    diffs = [float(np.abs(g.astype(np.float64) - want.astype(np.float64)).max()) for g in got]
    identical = sum(1 for g in got if np.array_equal(g, want))
    return {"ok": not errors and len(got) == a.threads * a.thread_runs and identical == len(got),
            "threads": a.threads, "runs_per_thread": a.thread_runs, "results": len(got),
            "identical_to_single_thread": identical, "max_abs_diff": max(diffs) if diffs else None,
            "errors": errors[:3], "seconds": round(time.time() - t0, 2)}


def check_cuda_graph(path, facts: ModelFacts, a) -> dict:
    import onnxruntime as ort

    batch, seq = 2, min(128, a.max_seq)
    dims = {"batch": batch, "sequence": seq}
    feeds = facts.feeds(batch, seq, seed=4)
    plain = make_session(path, "cuda", a.library, free_dims=dims)
    want = plain.run(None, feeds)[0]
    try:
        sess = make_session(path, "cuda", a.library, cuda_opts={"enable_cuda_graph": 1}, free_dims=dims)
    except Exception as e:
        return {"ok": False, "ran": False, "reason": "ORT refused CUDA graph capture for this model: "
                + str(e).replace("\n", " ")[:400]}
    dev = {k: ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) for k, v in feeds.items()}
    out_meta = sess.get_outputs()[0]
    out = ort.OrtValue.ortvalue_from_shape_and_type(list(want.shape), want.dtype, "cuda", 0)
    bind = sess.io_binding()
    for k, v in dev.items():
        bind.bind_ortvalue_input(k, v)
    bind.bind_ortvalue_output(out_meta.name, out)
    try:
        for _ in range(3):  # warm-up, capture, replay
            sess.run_with_iobinding(bind)
    except Exception as e:
        return {"ok": False, "ran": False, "reason": "capture failed: " + str(e).replace("\n", " ")[:400]}
    first = bool(np.array_equal(out.numpy(), want))
    new = facts.feeds(batch, seq, seed=5)
    for k, v in new.items():
        dev[k].update_inplace(v)
    sess.run_with_iobinding(bind)
    want2 = plain.run(None, new)[0]
    second = bool(np.array_equal(out.numpy(), want2))
    return {"ok": first and second, "ran": True, "batch": batch, "seq": seq,
            "replay_equals_plain": first, "replay_with_new_inputs_equals_plain": second,
            "max_abs_diff_new_inputs": float(np.abs(out.numpy().astype(np.float64) - want2.astype(np.float64)).max())}


def gpu_process_mib(device_id: int):
    """This process's memory on one GPU (NVML), or None where NVML cannot tell."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(device_id)
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
            if p.pid == os.getpid() and isinstance(p.usedGpuMemory, int):
                return round(p.usedGpuMemory / MIB)
        return 0
    except Exception:
        return None


def check_two_gpu(path, facts: ModelFacts, a) -> dict:
    import onnxruntime as ort

    try:  # ORT's own view of the devices (CUDA_VISIBLE_DEVICES included)
        ort.OrtValue.ortvalue_from_numpy(np.zeros(1, np.float32), "cuda", 1)
    except Exception as e:
        return {"ok": True, "ran": False, "skipped": "no second GPU visible to ORT: "
                + str(e).replace("\n", " ")[:200]}
    batch, seq = 2, min(128, a.max_seq)
    feeds = [facts.feeds(batch, seq, seed=10 + i) for i in range(4)]
    names = None

    def run(sess, dev, f):
        b = sess.io_binding()
        keep = [ort.OrtValue.ortvalue_from_numpy(v, "cuda", dev) for v in f.values()]
        for k, v in zip(f, keep):
            b.bind_ortvalue_input(k, v)
        b.bind_output(names[0], "cuda", dev)
        sess.run_with_iobinding(b)
        return b.get_outputs()[0].numpy()

    mem = {"device1_mib_before": gpu_process_mib(1)}
    s0 = make_session(path, "cuda", a.library, cuda_opts={"device_id": 0})
    names = [o.name for o in s0.get_outputs()]
    alone = [run(s0, 0, f) for f in feeds]  # device 0 while no session exists on device 1
    s1 = make_session(path, "cuda", a.library, cuda_opts={"device_id": 1})
    seq1 = [run(s1, 1, f) for f in feeds]
    mem["device1_mib_after_session"] = gpu_process_mib(1)
    got = {0: [], 1: []}
    errors = []

    def worker(sess, dev):
        try:
            for _ in range(a.thread_runs):
                for f in feeds:
                    got[dev].append(run(sess, dev, f))
        except Exception as e:
            errors.append(f"device {dev}: {str(e)[:300]}")

    ts = [threading.Thread(target=worker, args=(s, d)) for s, d in ((s0, 0), (s1, 1))]
    t0 = time.time()
    for t in ts:
        t.start()
    for t in ts:
        t.join()

    def worst(ys):
        return max(float(np.abs(y.astype(np.float64) - alone[i % len(feeds)].astype(np.float64)).max())
                   for i, y in enumerate(ys)) if ys else None

    same1 = all(np.array_equal(y, r) for y, r in zip(seq1, alone))
    conc = {d: sum(np.array_equal(y, alone[i % len(feeds)]) for i, y in enumerate(got[d])) for d in (0, 1)}
    n = a.thread_runs * len(feeds)
    grew = mem["device1_mib_after_session"] is None or mem["device1_mib_after_session"] > (mem["device1_mib_before"] or 0)
    finite = all(np.isfinite(y).all() for y in alone + seq1)
    why = [w for w, bad in (
        ("device 1 alone differs from device 0 alone", not same1),
        (f"concurrent runs: {conc[0]}/{n} on device 0, {conc[1]}/{n} on device 1 identical", conc[0] != n or conc[1] != n),
        ("errors: " + "; ".join(errors[:2]), bool(errors)),
        ("non-finite outputs", not finite),
        ("this process's memory on device 1 did not grow: did the session run there?", not grew)) if bad]
    return {"ok": not why, "ran": True, "reason": "; ".join(why) or None, "batch": batch, "seq": seq,
            "inputs": len(feeds), "device1_equals_device0": same1,
            "max_abs_diff_device1_vs_device0": worst(seq1),
            "concurrent_runs_per_device": n, "concurrent_identical": conc,
            "concurrent_max_abs_diff": {d: worst(got[d]) for d in (0, 1)}, "errors": errors[:3],
            "memory_mib": mem, "seconds": round(time.time() - t0, 2)}


def check_soak(sess, facts: ModelFacts, a, mem: Memory) -> dict:
    shapes = [(b, s) for b in a.batches for s in a.seqs if s <= a.max_seq]
    rng = random.Random(0)
    feeds = {sh: facts.feeds(*sh, seed=sh[0] * 100000 + sh[1]) for sh in shapes}
    out_names = [o.name for o in sess.get_outputs()]

    def run(sh, fetch):
        """One run; the first output on the host when `fetch` (else None). On CUDA the outputs
        stay on the device (ORT allocates them from its arena each run, as a server's would)."""
        if a.provider != "cuda":
            return sess.run(None, feeds[sh])[0]
        b = sess.io_binding()
        for k, v in feeds[sh].items():
            b.bind_cpu_input(k, v)
        for n in out_names:
            b.bind_output(n, "cuda")
        sess.run_with_iobinding(b)
        return b.get_outputs()[0].numpy() if fetch else None

    first = {}
    # Warm-up: every shape twice, so the arena and ORT's per-shape caches have reached their size.
    for sh in shapes * 2:
        first[sh] = run(sh, True)
    samples = []  # (run, gpu bytes or None, rss bytes)
    mismatches, nonfinite = [], 0
    every = max(1, a.runs // 50)
    t0 = time.time()
    runs = 0
    for i in range(a.runs):
        sh = rng.choice(shapes)
        y = run(sh, i % 97 == 0)
        runs += 1
        if i % 97 == 0:  # a full comparison is as costly as a run: sample it
            if not np.isfinite(y).all():
                nonfinite += 1
            if not np.array_equal(y, first[sh]):
                mismatches.append({"run": i, "shape": sh,
                                   "max_abs_diff": float(np.abs(y.astype(np.float64) - first[sh]).max())})
        if i % every == 0 or i == a.runs - 1:
            samples.append((i, mem.gpu() if mem.gpu else None, Memory.rss()))
        if time.time() - t0 > a.soak_max_s:
            break
    secs = time.time() - t0
    # Flat: judged on the second half of the samples (the first half may still see the arena
    # settle on a layout for the random order of shapes; a leak grows all the way through):
    # the last fifth no higher than the first fifth, and the fitted slope, each within the
    # allowance (per 10 000 runs for the slope).
    half = samples[len(samples) // 2:]

    def growth(idx):
        vals = [s[idx] for s in half if s[idx] is not None]
        if len(vals) < 2:
            return 0.0, 0.0
        k = max(1, len(vals) // 5)
        x = np.array([s[0] for s in half if s[idx] is not None], dtype=np.float64)
        slope = float(np.polyfit(x, np.array(vals, dtype=np.float64), 1)[0]) * 10000 if len(set(x)) > 1 else 0.0
        return float(np.mean(vals[-k:]) - np.mean(vals[:k])), slope

    gpu = [s[1] for s in samples if s[1] is not None]
    rss = [s[2] for s in samples]
    g_growth, g_slope = growth(1)
    r_growth, r_slope = growth(2)
    gpu_ok = not gpu or (g_growth <= a.gpu_tol_mib * MIB and g_slope <= a.gpu_tol_mib * MIB)
    rss_ok = r_growth <= a.rss_tol_mib * MIB and r_slope <= a.rss_tol_mib * MIB
    why = [w for w, bad in (
        (f"stopped at the time cap after {runs} of {a.runs} runs", runs < a.runs),
        (f"{len(mismatches)} sampled outputs differ from the first of their shape", bool(mismatches)),
        (f"{nonfinite} sampled outputs not finite", bool(nonfinite)),
        (f"device memory grew {g_growth / MIB:.1f} MiB (slope {g_slope / MIB:.1f} MiB per 10k runs)", not gpu_ok),
        (f"host RSS grew {r_growth / MIB:.1f} MiB (slope {r_slope / MIB:.1f} MiB per 10k runs)", not rss_ok)) if bad]
    return {"ok": not why, "reason": "; ".join(why) or None,
            "runs": runs, "runs_requested": a.runs, "seconds": round(secs, 1), "shapes": shapes,
            "mismatches_vs_first_output": mismatches[:5], "mismatch_count": len(mismatches), "nonfinite_outputs": nonfinite,
            "gpu_memory_probe": getattr(mem, "how", None),
            "gpu_used_mib_first_last": [round(gpu[0] / MIB), round(gpu[-1] / MIB)] if gpu else None,
            "judged_on_runs_from": half[0][0] if half else None,
            "gpu_growth_mib": round(g_growth / MIB, 1), "gpu_slope_mib_per_10k_runs": round(g_slope / MIB, 2),
            "rss_mib_first_last": [round(rss[0] / MIB), round(rss[-1] / MIB)],
            "rss_growth_mib": round(r_growth / MIB, 1), "rss_slope_mib_per_10k_runs": round(r_slope / MIB, 2),
            "tolerance_mib": {"gpu": a.gpu_tol_mib, "rss": a.rss_tol_mib},
            "samples": [(i, None if g is None else round(g / MIB), round(r / MIB)) for i, g, r in samples]}


# ---------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a model fused by flash-ort")
    ap.add_argument("--label", help="name in the JSON (default: the file name)")
    ap.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--library", default=os.environ.get("FLASH_ORT_LIB", str(ROOT / "target" / "release" / "libflash_ort.so")))
    # bad_inputs last: on CUDA a kernel of ORT's that reads an index out of bounds would poison the
    # process's CUDA context, and the other checks should not pay for that.
    ap.add_argument("--checks", default="threads,cuda_graph,soak,bad_inputs")
    ap.add_argument("--runs", type=int, default=10000, help="soak runs")
    ap.add_argument("--soak-max-s", type=float, default=240.0, help="stop the soak after this many seconds (then it fails: fewer runs than asked)")
    ap.add_argument("--seqs", default="8,32,77,128,300,512")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--max-seq", type=int, default=None, help="largest sequence to use (default: the position table, else 512)")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--thread-runs", type=int, default=10)
    ap.add_argument("--gpu-tol-mib", type=float, default=16.0)
    ap.add_argument("--rss-tol-mib", type=float, default=32.0)
    ap.add_argument("--out", help="append this model's results to this JSON file")
    a = ap.parse_args()
    a.seqs = [int(s) for s in a.seqs.split(",")]
    a.batches = [int(b) for b in a.batches.split(",")]

    import onnxruntime as ort

    if a.provider == "cuda":
        try:
            ort.preload_dlls()
        except Exception:
            pass
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            ap.error("--provider cuda needs onnxruntime-gpu")
    if not os.path.exists(a.library):
        ap.error(f"--library {a.library}: no such file")
    facts = ModelFacts(a.model)
    a.max_seq = a.max_seq or facts.max_positions or 512
    if facts.flash_nodes == 0:
        log(f"warning: {a.model} has no com.flash nodes; checking it anyway")
    t0 = time.time()
    sess = make_session(a.model, a.provider, a.library)
    mem = Memory(a.provider)
    rec = {"model": a.label or Path(a.model).name, "provider": a.provider, "onnxruntime": ort.__version__,
           "flash_nodes": facts.flash_nodes, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
           "session_providers": sess.get_providers(), "checks": {}}
    for check in a.checks.split(","):
        t = time.time()
        try:
            if check == "bad_inputs":
                r = check_bad_inputs(sess, facts, a)
            elif check == "threads":
                r = check_threads(sess, facts, a)
            elif check == "cuda_graph":
                if a.provider != "cuda":
                    continue
                r = check_cuda_graph(a.model, facts, a)
            elif check == "two_gpu":  # CUDA whatever --provider says; skipped without two GPUs
                r = check_two_gpu(a.model, facts, a)
            elif check == "soak":
                r = check_soak(sess, facts, a, mem)
            else:
                ap.error(f"unknown check {check!r}")
        except Exception as e:
            r = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:500]}"}
        r["seconds"] = r.get("seconds", round(time.time() - t, 1))
        rec["checks"][check] = r
        log(f"{rec['model']}: {check}: {'SKIPPED' if r.get('ran') is False and r['ok'] else 'PASS' if r['ok'] else 'FAIL'} "
            + json.dumps({k: v for k, v in r.items() if k not in ("cases", "samples", "shapes")})[:400])
    rec["ok"] = all(c["ok"] for c in rec["checks"].values())
    rec["seconds"] = round(time.time() - t0, 1)
    if a.out:
        doc = json.loads(Path(a.out).read_text()) if Path(a.out).exists() else {"results": []}
        doc["results"] = [r for r in doc["results"] if r["model"] != rec["model"] or r["provider"] != rec["provider"]] + [rec]
        Path(a.out).write_text(json.dumps(doc, indent=1))
    print(json.dumps({"model": rec["model"], "ok": rec["ok"],
                      "checks": {k: v["ok"] for k, v in rec["checks"].items()}}))
    return 0 if rec["ok"] else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SystemExit:
        raise
    except Exception as e:
        log(f"error: {type(e).__name__}: {e}")
        sys.exit(2)
