#!/usr/bin/env python3
"""Where a model's time goes in onnxruntime's CUDA EP: per-node placement and per-kernel GPU time.

    profile_model.py nodes   --forms DIR/forms.json [--models M] [--batch 1] [--seq 2048]
        Runs each form once with ORT's profiler on; prints the node count per (provider, op type),
        the host-side node time of CPU-placed nodes, and the Memcpy nodes ORT inserted.
    profile_model.py kernels --forms DIR/forms.json --models M --form F [--batch 1] [--seq 2048]
        Warms up, then runs once between cudaProfilerStart/Stop: meant to run under
        `ncu --profile-from-start off --csv --metrics gpu__time_duration.sum`.
    profile_model.py summarize NCU.csv [--top 15]
        Sums the GPU time per kernel name from that CSV.
    profile_model.py hostgap --forms DIR/forms.json --models M --only F,G [--batch 1] [--seq 2048]
        Latency of each form as run (launches from the host every time) and replayed from an ORT
        CUDA graph (enable_cuda_graph: no host work per kernel), interleaved, plus the host time
        ORT's profiler gives each op type's Compute: shows whether a form loses time to the host.

The device tool's GPU machine runs them from scripts/profile_gpu.sh.
"""
from __future__ import annotations

import argparse
import collections
import csv
import ctypes
import glob
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import model_bench  # noqa: E402  (make_feeds: the benchmark's own inputs)


def session(path: str, library: str | None, profile_dir: str | None = None, cuda_graph: bool = False):
    import onnxruntime as ort

    try:
        ort.preload_dlls()
    except Exception:
        pass
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if library:
        so.register_custom_ops_library(library)
    if profile_dir:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(profile_dir, "ort")
    cuda = {"device_id": 0, "enable_cuda_graph": "1"} if cuda_graph else {"device_id": 0}
    return ort.InferenceSession(path, so, providers=[("CUDAExecutionProvider", cuda), "CPUExecutionProvider"])


def bound_run(sess, feeds):
    """One run with inputs and outputs in device memory (what model_bench measures)."""
    import onnxruntime as ort

    b = sess.io_binding()
    keep = []
    for n, x in feeds.items():
        v = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
        keep.append(v)
        b.bind_ortvalue_input(n, v)
    for o in sess.get_outputs():
        b.bind_output(o.name, "cuda", 0)
    return b, keep


def library_for(a, form: str) -> str | None:
    """The flash-ort library for the forms with com.flash nodes (model_bench.OURS), else none."""
    return a.library if form in model_bench.OURS else None


def profiled_runs(path: str, lib: str | None, feeds, iters: int):
    """One warm-up and `iters` timed runs with ORT's profiler on: (seconds per run, its events)."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = session(path, lib, tmp)
        b, keep = bound_run(sess, feeds)
        sess.run_with_iobinding(b)  # warm-up (allocations, autotuning)
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            sess.run_with_iobinding(b)
            times.append(time.perf_counter() - t)
        return times, json.loads(Path(sess.end_profiling()).read_text())


def node_times(events):
    """(provider, op type, host µs) of each node run ORT's profiler recorded."""
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            args = e.get("args", {})
            yield args.get("provider", "?"), args.get("op_name", "?"), e.get("dur", 0)


def forms_of(a):
    doc = json.loads(Path(a.forms).read_text())
    folder = Path(a.forms).parent
    for m, entry in doc["models"].items():
        if a.models and m not in a.models.split(","):
            continue
        for f, info in entry["forms"].items():
            if info.get("file") and not info.get("error") and (not getattr(a, "form", None) or f == a.form):
                yield m, f, str(folder / info["file"]), entry


def cmd_nodes(a) -> int:
    for m, f, path, entry in forms_of(a):
        feeds = model_bench.make_feeds(entry["inputs"], entry["config"]["vocab_size"], a.batch, a.seq)
        times, events = profiled_runs(path, library_for(a, f), feeds, a.iters)
        runs = a.iters + 1
        per = collections.Counter()
        cpu_us = collections.Counter()
        for prov, op, dur in node_times(events):
            per[(prov, op)] += 1
            if prov == "CPUExecutionProvider":
                cpu_us[(prov, op)] += dur
        print(f"\n## {m} / {f}  B={a.batch} S={a.seq}: median {sorted(times)[len(times) // 2] * 1e3:.2f} ms over {a.iters} runs")
        print("| provider | op | nodes | host us/run (CPU nodes) |\n|---|---|---|---|")
        for (prov, op), n in sorted(per.items(), key=lambda kv: (kv[0][0], -kv[1])):
            us = cpu_us.get((prov, op), 0) / runs
            print(f"| {prov.replace('ExecutionProvider', '')} | {op} | {n // runs} | {us:.0f} |")
        sys.stdout.flush()
    return 0


def cmd_hostgap(a) -> int:
    only = a.only.split(",") if a.only else None
    forms = [(m, f, path, entry) for m, f, path, entry in forms_of(a) if not only or f in only]
    runs = {}
    host = {}
    for m, f, path, entry in forms:
        lib = library_for(a, f)
        feeds = model_bench.make_feeds(entry["inputs"], entry["config"]["vocab_size"], a.batch, a.seq)
        for graph in (False, True):
            try:
                sess = session(path, lib, cuda_graph=graph)
                b, keep = bound_run(sess, feeds)
                for _ in range(3):  # warm-up; with a graph the first run captures it
                    sess.run_with_iobinding(b)
                runs[(f, graph)] = (sess, b, keep)
            except Exception as e:  # noqa: BLE001  (a form ORT cannot capture: say so)
                print(f"{m}/{f} cuda_graph={graph}: {str(e)[:160]}")
        _, events = profiled_runs(path, lib, feeds, a.iters)
        us = collections.Counter()
        for _, op, dur in node_times(events):
            us[op] += dur / (1 + a.iters)
        host[f] = us
    times = collections.defaultdict(list)
    for _ in range(a.iters):  # interleaved: every form and mode each round
        for key, (sess, b, keep) in runs.items():
            t = time.perf_counter()
            sess.run_with_iobinding(b)
            times[key].append(time.perf_counter() - t)
    print(f"\n## B={a.batch} S={a.seq}: median ms over {a.iters} interleaved runs")
    print("| form | as run | CUDA graph replay | host us per run in Compute (top op types) |\n|---|---|---|---|")
    for m, f, path, entry in forms:
        med = lambda k: f"{sorted(times[k])[len(times[k]) // 2] * 1e3:.2f}" if times.get(k) else "-"
        top = ", ".join(f"{op} {v:.0f}" for op, v in host[f].most_common(4))
        print(f"| {f} | {med((f, False))} | {med((f, True))} | {top} (all: {sum(host[f].values()):.0f}) |")
    sys.stdout.flush()
    return 0


def cmd_kernels(a) -> int:
    rt = None
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            rt = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if rt is None:
        for cand in glob.glob("/usr/local/cuda*/lib64/libcudart.so*"):
            rt = ctypes.CDLL(cand)
            break
    for m, f, path, entry in forms_of(a):
        sess = session(path, library_for(a, f))
        feeds = model_bench.make_feeds(entry["inputs"], entry["config"]["vocab_size"], a.batch, a.seq)
        b, keep = bound_run(sess, feeds)
        for _ in range(3):
            sess.run_with_iobinding(b)
        rt.cudaDeviceSynchronize()
        rt.cudaProfilerStart()
        sess.run_with_iobinding(b)
        rt.cudaDeviceSynchronize()
        rt.cudaProfilerStop()
        print(f"profiled {m}/{f}", file=sys.stderr)
        break
    return 0


def cmd_summarize(a) -> int:
    lines = Path(a.csv).read_text(errors="replace").splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
    if start is None:
        print(f"no ncu table in {a.csv}:\n" + "\n".join(lines[-10:]))
        return 1
    total = collections.Counter()
    count = collections.Counter()
    for row in csv.DictReader(lines[start:]):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        v = float(row["Metric Value"].replace(",", ""))
        unit = row.get("Metric Unit", "ns")
        v *= {"ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "nsecond": 1e-3}.get(unit, 1e-3)
        name = row["Kernel Name"][:90]
        total[name] += v
        count[name] += 1
    all_us = sum(total.values())
    print(f"GPU time {all_us / 1e3:.3f} ms in {sum(count.values())} kernels")
    print("| kernel | launches | us | share |\n|---|---|---|---|")
    for name, us in total.most_common(a.top):
        print(f"| `{name}` | {count[name]} | {us:.0f} | {100 * us / all_us:.1f}% |")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("nodes", "kernels", "hostgap"):
        p = sub.add_parser(name)
        p.add_argument("--forms", required=True)
        p.add_argument("--models")
        p.add_argument("--library", default=os.environ.get("FLASH_ORT_LIB"))
        p.add_argument("--batch", type=int, default=1)
        p.add_argument("--seq", type=int, default=2048)
        p.add_argument("--iters", type=int, default=5)
        if name == "kernels":
            p.add_argument("--form", required=True)
        if name == "hostgap":
            p.add_argument("--only", help="comma-separated forms (default: all)")
    p = sub.add_parser("summarize")
    p.add_argument("csv")
    p.add_argument("--top", type=int, default=15)
    a = ap.parse_args()
    return {"nodes": cmd_nodes, "kernels": cmd_kernels, "hostgap": cmd_hostgap, "summarize": cmd_summarize}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
