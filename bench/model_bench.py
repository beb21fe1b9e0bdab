#!/usr/bin/env python3
"""Whole models in ONNX Runtime, side by side in one run: the unfused export, the same export after
ORT's transformer optimizer (where it fuses attention), after `flash-ort fuse`, and after ORT's
optimizer with its attention fusion off followed by `flash-ort fuse` (ORT fuses LayerNorm, GELU,
bias and residual adds; flash-ort the attention). Latency and peak device memory against sequence
length, and the longest sequence each form can run.

    model_bench.py prepare --manifest DIR/manifest_large.json --flash-ort BIN [--ort-opt]
        [--ort-opt-flash] [--parity]
        writes DIR/NAME.flash.onnx (and NAME.ortopt.onnx where ORT's optimizer fuses attention,
        NAME.ortopt_flash.onnx where ORT's optimizer without attention fusion fuses anything)
        and DIR/forms.json, the list of (model, form, file) the other commands measure; --parity
        runs every form against the unfused export in ORT (right-padded batch, valid positions
        compared) and records the worst difference
    model_bench.py run --forms DIR/forms.json --out RESULTS.json [--seqs 128,512,2048,8192,32768]
        [--batches 1,8] [--models bert_base_eager_ts17,...] [--forms-only unfused,flash]
        [--provider cuda|cpu] [--budget-s 300] [--gpu-mem-limit-gb 80]
    model_bench.py maxseq --forms DIR/forms.json --out RESULTS.json [--cap 131072] [--budget-s 120]
    model_bench.py table RESULTS.json            markdown tables of what RESULTS.json holds

How it measures (each choice is there because a simpler one gave wrong numbers):
- Every (model, form) runs in its own subprocess, so one form's memory, arena and CUDA state never
  leak into another's and an out-of-memory crash costs only that form's remaining points.
- Inputs and outputs are bound to device memory (io_binding), so latency is the model's, not PCIe's.
- CUDA EP arena: `arena_extend_strategy=kSameAsRequested` (the arena grows by what is asked, not
  by powers of two) and `gpu_mem_limit` (default 80 GiB: "runs in 80 GB" on any card). Before each
  point one run at a tiny shape with `memory.enable_memory_arena_shrinkage` returns every free
  region to the driver; device memory in use after the first run at the point, minus what was in
  use before the session was made, is the point's peak (the arena keeps whatever it grew to during
  that run). Read through NVML, else torch.cuda.mem_get_info, else nvidia-smi. NVML's
  per-process figure is used where it lists this process, so other work on the GPU does not
  count; otherwise (device-wide figures) nothing else may run on the GPU meanwhile.
- CPU provider: the CPU arena is off and the peak is the process's peak RSS (VmHWM, reset before
  each point) minus the RSS before the session was made.
- Latency: first run (the memory run), one warm-up, then repeats until `--target-s` seconds of
  runs (at least 2, at most `--max-iters`); median and min are reported. ORT synchronizes the CUDA
  stream at the end of each Run, so host timers bracket the device work.
- A point whose run fails for memory is `oom`; points that need at least as much (batch and
  sequence both no smaller) are then `skipped`. A time budget (`--budget-s`) skips what would not
  finish, and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

FORMS = ("unfused", "ort_opt", "flash", "ort_opt_flash", "ort_opt_flash_pack", "ort_opt_flash_nopack")
FORM_LABEL = {"unfused": "unfused export", "ort_opt": "ORT transformer optimizer", "flash": "flash-ort fuse",
              "ort_opt_flash": "ORT optimizer without attention fusion, then flash-ort fuse",
              "ort_opt_flash_pack": "the same with flash-ort fuse --no-fold-bias (K/V biases kept, Q/K/V packed)",
              "ort_opt_flash_nopack": "the same with flash-ort fuse --no-pack-qkv --no-fold-bias (three "
                                      "projections, three bias Adds)"}
OURS = ("flash", "ort_opt_flash", "ort_opt_flash_pack", "ort_opt_flash_nopack")  # forms with com.flash nodes: their sessions load the library
THEIRS = ("unfused", "ort_opt")    # what the issue compares ours against
ORT_ATTENTION_OPS = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                     "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention", "SparseAttention"}
# ORT optimizer model types to try per architecture (export_large.py names). ORT has no LLaMA type
# in optimize_model; the nearest decoder types are tried (they fused nothing on the tiny exports,
# models/ORT_OPTIMIZER_COMPARISON.md, but a real-size export is checked again).
ORT_OPT_TYPES = {"bert_base": ["bert"], "gpt2_small": ["gpt2"], "llama_gqa_2k": ["qwen3", "gpt2"]}
# With attention fusion off, one type per architecture: the fusions left (LayerNorm, RMSNorm,
# SkipLayerNorm, BiasGelu, EmbedLayerNorm) are shared by the BERT-family optimizer classes; "gpt2"
# fuses LLaMA's RMSNorm (SimplifiedLayerNormalization) in a float32 export.
ORT_OPT_FLASH_TYPES = {"bert_base": "bert", "gpt2_small": "gpt2", "llama_gqa_2k": "gpt2"}
OOM_PATTERNS = re.compile(r"out of memory|Failed to allocate|BFCArena|CUBLAS_STATUS_ALLOC_FAILED|"
                          r"cudaErrorMemoryAllocation|bad_alloc|Cannot allocate", re.I)
SHRINK = "memory.enable_memory_arena_shrinkage"
MIB = 2 ** 20


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------

def count_ops(model, domain, ops) -> int:
    return sum(1 for n in model.graph.node if n.domain == domain and n.op_type in ops)


def flash_fuse(binary: str, src: Path, dst: Path, extra: tuple = ()) -> dict:
    t0 = time.time()
    p = subprocess.run([binary, "fuse", str(src), "-o", str(dst), "--report", str(dst) + ".report.json", *extra],
                       capture_output=True, text=True, timeout=900)
    rec = {"seconds": round(time.time() - t0, 1), "summary": p.stdout.strip().splitlines()[-2:-1]}
    if p.returncode != 0:
        rec["error"] = f"flash-ort fuse exited {p.returncode}: {(p.stderr or p.stdout).strip()[:600]}"
        return rec
    import onnx

    rec["fused_sites"] = count_ops(onnx.load(str(dst), load_external_data=False), "com.flash", {"FlashAttention"})
    rec["file"] = dst.name
    return rec


def ort_optimize(src: Path, dst: Path, rec: dict, use_gpu: bool) -> dict:
    """Best attention-fusion count over the architecture's optimizer types (opt_level 0: ORT's
    own session optimizations still run at load time, as for the other forms)."""
    import contextlib
    import io
    import logging

    from onnxruntime.transformers import optimizer

    logging.disable(logging.WARNING)
    cfg = rec["config"]
    tried, best = [], None
    for model_type in ORT_OPT_TYPES.get(rec["architecture"], ["bert"]):
        t0 = time.time()
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                opt = optimizer.optimize_model(str(src), model_type=model_type, num_heads=cfg["num_attention_heads"],
                                               hidden_size=cfg["hidden_size"], opt_level=0, use_gpu=use_gpu)
            fused = count_ops(opt.model, "com.microsoft", ORT_ATTENTION_OPS)
            tried.append({"model_type": model_type, "fused": fused, "seconds": round(time.time() - t0, 1)})
            if fused and (best is None or fused > best[1]):
                best = (opt, fused, model_type)
        except Exception as e:
            tried.append({"model_type": model_type, "error": f"{type(e).__name__}: {str(e)[:200]}",
                          "seconds": round(time.time() - t0, 1)})
    out = {"tried": tried, "fused_sites": best[1] if best else 0}
    if best:
        big = os.path.getsize(src) + sum(os.path.getsize(p) for p in src.parent.glob(src.name + ".data")) > 1.8e9
        best[0].save_model_to_file(str(dst), use_external_data_format=big, all_tensors_to_one_file=True)
        out.update(file=dst.name, model_type=best[2])
    return out


def no_attention_options(model_type: str):
    """ORT's fusions minus everything that would swallow (part of) an attention subgraph."""
    from onnxruntime.transformers.fusion_options import AttentionMaskFormat, FusionOptions

    o = FusionOptions(model_type)
    o.enable_attention = False          # flash-ort fuses attention
    o.use_multi_head_attention = False
    o.enable_rotary_embeddings = False  # a RotaryEmbedding node would sit inside the Q/K path
    for packed in ("enable_packed_qkv", "enable_packed_kv"):  # stable-diffusion types only
        if hasattr(o, packed):
            setattr(o, packed, False)
    # Keep the 2-D mask as it is: MaskIndexEnd (BERT's default) lets EmbedLayerNormalization turn
    # it into an index that only ORT's Attention reads.
    o.attention_mask_format = AttentionMaskFormat.AttentionMask
    return o


def optimize_without_attention(path: Path, model_type: str, cfg: dict):
    """ORT's transformer optimizer over `path` with `no_attention_options` (its output quiet)."""
    import contextlib
    import io

    from onnxruntime.transformers import optimizer

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return optimizer.optimize_model(str(path), model_type=model_type, num_heads=cfg["num_attention_heads"],
                                        hidden_size=cfg["hidden_size"], opt_level=0, use_gpu=False,
                                        optimization_options=no_attention_options(model_type))


def ort_opt_flash(binary: str, src: Path, mid: Path, dst: Path, rec: dict) -> dict:
    """ORT's transformer optimizer with attention fusion off (LayerNorm/RMSNorm, SkipLayerNorm,
    BiasGelu, EmbedLayerNorm, bias+skip fusions on), then `flash-ort fuse` on its output, then
    the same optimizer pass once more: what the attention subgraphs hid from the first pass
    (BERT's EmbedLayerNormalization, whose match wants the embedding output read by the
    projections and the residual only, not by the mask construction's Shape) fuses now that
    flash-ort has dropped them. No file when the optimizer fuses nothing (the form would be the
    `flash` form again) or leaves an attention op of its own."""
    import logging

    import onnx

    logging.disable(logging.WARNING)
    cfg = rec["config"]
    model_type = ORT_OPT_FLASH_TYPES.get(rec["architecture"], "bert")
    out = {"optimizer": {"model_type": model_type}}
    t0 = time.time()
    try:
        opt = optimize_without_attention(src, model_type, cfg)
    except Exception as e:
        out["error"] = f"ORT optimizer ({model_type}, attention off): {type(e).__name__}: {str(e)[:300]}"
        return out
    fused_ops = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    attn = count_ops(opt.model, "com.microsoft", ORT_ATTENTION_OPS)
    out["optimizer"].update(fused_ops=fused_ops, seconds=round(time.time() - t0, 1))
    if attn:
        out["error"] = f"ORT optimizer left {attn} attention ops of its own with attention fusion off"
        return out
    if not fused_ops:
        out["skipped"] = (f"ORT's optimizer ({model_type}, attention fusion off) fused nothing in this export: "
                          "the form would be the flash form again")
        return out
    big = os.path.getsize(src) + sum(os.path.getsize(p) for p in src.parent.glob(src.name + ".data")) > 1.8e9
    opt.save_model_to_file(str(mid), use_external_data_format=big, all_tensors_to_one_file=True)
    del opt
    out["optimizer"]["file"] = mid.name
    fl = flash_fuse(binary, mid, dst)
    if "error" not in fl:
        out["optimizer_after_fuse"] = ort_optimize_again(dst, model_type, cfg, big)
    out.update({k: v for k, v in fl.items() if k != "seconds"}, seconds=round(time.time() - t0, 1))
    if "error" not in fl:
        out["file"] = dst.name
        # The other forms' op counts, for the table: what is left of the non-attention work.
        m = onnx.load(str(dst), load_external_data=False)
        out["ops"] = dict(sorted(Counter(n.op_type for n in m.graph.node if n.op_type != "Constant").items()))
    return out


def ort_optimize_again(path: Path, model_type: str, cfg: dict, big: bool) -> dict:
    """The attention-off optimizer pass over a flash-ort output, kept (in place) when it fuses
    something more; what it fused, or why not."""
    import onnx

    try:
        opt = optimize_without_attention(path, model_type, cfg)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    before = Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
    after = Counter(n.op_type for n in opt.model.graph.node)
    new_ops = {op: n - before.get(op, 0) for op, n in after.items() if n > before.get(op, 0) and op != "Constant"}
    flash = sum(1 for n in opt.model.graph.node if n.domain == "com.flash")
    if not new_ops or flash != before.get("FlashAttention", 0):
        return {"fused": {}, "kept": False}
    opt.save_model_to_file(str(path), use_external_data_format=big, all_tensors_to_one_file=True)
    return {"fused": new_ops, "kept": True}


def parity(folder: Path, entry: dict, provider: str, library: str | None, seq: int = 16) -> dict:
    """Every form against the unfused export in ORT: batch 2, the second row right-padded by a
    third; outputs compared at the valid positions (what padded positions hold is not specified)."""
    import numpy as np
    import onnxruntime as ort

    if provider == "cuda":
        try:
            ort.preload_dlls()
        except Exception:
            pass
    seq = min(seq, entry["config"].get("max_positions") or seq)
    feeds = make_feeds(entry["inputs"], entry["config"]["vocab_size"], 2, seq, seed=7)
    valid = np.ones((2, seq), dtype=bool)
    valid[1, seq - seq // 3:] = False
    for i in entry["inputs"]:
        if i["name"] == "attention_mask" or i.get("role") == "attention_mask":
            feeds[i["name"]] = valid.astype(np.int64)

    def run(form):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if form in OURS:
            so.register_custom_ops_library(library)
        providers = ([("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"] if provider == "cuda"
                     else ["CPUExecutionProvider"])
        sess = ort.InferenceSession(str(folder / entry["forms"][form]["file"]), so, providers=providers)
        return sess.run(None, feeds)[0]

    tol = 2e-2 if entry.get("dtype") == "float16" else 1e-3
    ref = run("unfused").astype(np.float64)
    out = {}
    for f in FORMS[1:]:
        info = entry["forms"].get(f) or {}
        if not info.get("file") or info.get("error"):
            continue
        t0 = time.time()
        try:
            y = run(f).astype(np.float64)
        except Exception as e:
            out[f] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        if y.shape != ref.shape:
            out[f] = {"ok": False, "error": f"output shape {list(y.shape)} vs unfused {list(ref.shape)}"}
            continue
        a, b = (ref[valid], y[valid]) if ref.shape[:2] == valid.shape else (ref, y)
        rel = float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))
        out[f] = {"ok": bool(np.isfinite(b).all() and rel <= tol), "max_abs": float(np.abs(a - b).max()),
                  "ref_max_abs": float(np.abs(a).max()), "rel_l2": rel, "tolerance_rel_l2": tol,
                  "seconds": round(time.time() - t0, 1)}
    return {"batch": 2, "seq": seq, "padded_rows": 1, "provider": provider, "forms": out}


def cmd_prepare(a) -> int:
    manifest = json.loads(Path(a.manifest).read_text())
    folder = Path(a.manifest).parent
    want = set(a.models.split(",")) if a.models else None
    forms_path = folder / "forms.json"
    doc = json.loads(forms_path.read_text()) if forms_path.exists() else {"models": {}}
    for rec in manifest["models"]:
        name = Path(rec["file"]).stem
        if want and name not in want and rec["architecture"] not in want:
            continue
        src = folder / rec["file"]
        entry = doc["models"].setdefault(name, {})
        entry.update({"architecture": rec["architecture"], "exporter": rec["exporter"], "opset": rec["opset"],
                      "attn_implementation": rec["attn_implementation"], "dtype": rec.get("dtype", "float32"),
                      "config": rec["config"], "inputs": rec["inputs"], "attention_sites": rec["attention_sites"],
                      "onnx_attention_nodes": rec.get("graph", {}).get("onnx_attention_nodes", 0),
                      "size_bytes": rec.get("size_bytes")})
        forms = entry.setdefault("forms", {})
        forms["unfused"] = {"file": rec["file"]}
        made = False  # a form made by this call: its parity is not known yet
        if "flash" not in forms or a.force:
            made = True
            log(f"{name}: flash-ort fuse ...")
            forms["flash"] = flash_fuse(a.flash_ort, src, folder / f"{name}.flash.onnx")
            log(f"{name}: flash {forms['flash']}")
        if a.ort_opt and ("ort_opt" not in forms or a.force):
            made = True
            log(f"{name}: ORT transformer optimizer ...")
            forms["ort_opt"] = ort_optimize(src, folder / f"{name}.ortopt.onnx", rec, use_gpu=a.provider == "cuda")
            log(f"{name}: ort_opt {forms['ort_opt']}")
        if a.ort_opt_flash and ("ort_opt_flash" not in forms or a.force):
            made = True
            log(f"{name}: ORT transformer optimizer without attention fusion, then flash-ort fuse ...")
            forms["ort_opt_flash"] = ort_opt_flash(a.flash_ort, src, folder / f"{name}.ortopt_noattn.onnx",
                                                   folder / f"{name}.ortopt_flash.onnx", rec)
            log(f"{name}: ort_opt_flash {forms['ort_opt_flash']}")
        mid = folder / f"{name}.ortopt_noattn.onnx"
        # The A/B forms of the same optimized graph: Q/K/V packed (no bias fold), and neither.
        for form, flags in (("ort_opt_flash_pack", ("--no-fold-bias",)),
                            ("ort_opt_flash_nopack", ("--no-pack-qkv", "--no-fold-bias"))):
            if a.nopack and mid.exists() and forms.get("ort_opt_flash", {}).get("file") and \
                    (form not in forms or a.force):
                made = True
                forms[form] = flash_fuse(a.flash_ort, mid, folder / f"{name}.{form.replace('ort_opt_flash', 'ortopt_flash')}.onnx",
                                         flags)
                log(f"{name}: {form} {forms[form]}")
        forms_path.write_text(json.dumps(doc, indent=1))
        if a.parity and (made or "forms" not in (entry.get("parity") or {})):
            log(f"{name}: parity of every form against the unfused export ({a.provider}) ...")
            try:
                entry["parity"] = parity(folder, entry, a.provider, a.library)
            except Exception as e:
                entry["parity"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            log(f"{name}: parity {json.dumps(entry['parity'])}")
            forms_path.write_text(json.dumps(doc, indent=1))
    print(forms_path)
    return 0


# ---------------------------------------------------------------------------------------------
# the child: one (model, form) session, several points
# ---------------------------------------------------------------------------------------------

class DeviceMemory:
    """Bytes in use on one GPU (device-wide), or this process's peak RSS on the CPU."""

    def __init__(self, provider: str, device_id: int = 0):
        self.provider, self.how = provider, None
        if provider == "cpu":
            self.how = "VmHWM"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device_id)
            # This process's own usage when NVML lists it (the caller has made its CUDA context
            # already), so other work on the GPU cannot pollute the figure; else device-wide.
            self.how = "nvml-process" if self._own() is not None else "nvml-device"
            return
        except Exception:
            pass
        try:
            import torch

            if torch.cuda.is_available():
                self.torch, self.device_id, self.how = torch, device_id, "torch.cuda.mem_get_info"
                return
        except Exception:
            pass
        if shutil.which("nvidia-smi"):
            self.device_id, self.how = device_id, "nvidia-smi"
            return
        raise RuntimeError("no way to read GPU memory: need pynvml, torch with CUDA or nvidia-smi")

    def _own(self):
        for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
            if p.pid == os.getpid() and isinstance(p.usedGpuMemory, int):
                return int(p.usedGpuMemory)
        return None

    def reset_peak(self):
        if self.how == "VmHWM":
            try:  # "5" resets the peak RSS counter of this process (Linux >= 4.0)
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass

    def used(self) -> int:
        if self.how == "VmHWM":
            return proc_status("VmHWM")
        if self.how == "nvml-process":
            return self._own() or 0
        if self.how == "nvml-device":
            return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)
        if self.how == "torch.cuda.mem_get_info":
            free, total = self.torch.cuda.mem_get_info(self.device_id)
            return int(total - free)
        out = subprocess.run(["nvidia-smi", "-i", str(self.device_id), "--query-gpu=memory.used",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, check=True)
        return int(out.stdout.strip()) * MIB


def proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def make_feeds(inputs, vocab, batch, seq, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds = {}
    for i in inputs:
        n = i["name"]
        if n == "input_ids" or i.get("role") == "token_ids":
            feeds[n] = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
        elif n == "attention_mask" or i.get("role") == "attention_mask":
            feeds[n] = np.ones((batch, seq), dtype=np.int64)
        elif n == "token_type_ids" or i.get("role") == "token_type_ids":
            feeds[n] = np.zeros((batch, seq), dtype=np.int64)
        elif n == "position_ids":
            feeds[n] = np.tile(np.arange(seq, dtype=np.int64), (batch, 1))
        else:
            raise ValueError(f"input {n!r}: no rule to generate it")
    return feeds


def classify(e: Exception) -> str:
    return "oom" if OOM_PATTERNS.search(str(e)) else "error"


def child(spec: dict) -> int:
    """Runs in its own process: prints one `RESULT {json}` line per event, flushing each."""
    import numpy as np
    import onnxruntime as ort

    def emit(d):
        print("RESULT " + json.dumps(d), flush=True)

    provider, dev = spec["provider"], spec.get("device_id", 0)
    if provider == "cuda":
        try:
            ort.preload_dlls()
        except Exception:
            pass
    if provider == "cuda":
        # Make this process's CUDA context first (a one-element device tensor), so the memory
        # baseline below already holds it and NVML can list this process.
        ctx = ort.OrtValue.ortvalue_from_numpy(np.zeros(1, np.float32), "cuda", dev)
    mem = DeviceMemory(provider, dev)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if spec.get("library"):
        so.register_custom_ops_library(spec["library"])
    if provider == "cuda":
        opts = {"device_id": dev, "arena_extend_strategy": "kSameAsRequested"}
        if spec.get("gpu_mem_limit"):
            opts["gpu_mem_limit"] = int(spec["gpu_mem_limit"])
        providers = [("CUDAExecutionProvider", opts), "CPUExecutionProvider"]
        device = "cuda"
    else:
        so.enable_cpu_mem_arena = False
        providers = ["CPUExecutionProvider"]
        device = "cpu"
    mem.reset_peak()
    base = mem.used()
    rss0 = proc_status("VmRSS")
    t0 = time.perf_counter()
    try:
        sess = ort.InferenceSession(spec["path"], so, providers=providers)
    except Exception as e:
        emit({"event": "session", "status": classify(e), "error": str(e)[:600]})
        return 3
    weights = mem.used() - base
    emit({"event": "session", "status": "ok", "load_s": round(time.perf_counter() - t0, 2),
          "weights_mib": round(weights / MIB), "memory_probe": mem.how, "providers": sess.get_providers()})
    out_names = [o.name for o in sess.get_outputs()]
    shrink = ort.RunOptions()
    if provider == "cuda":
        shrink.add_run_config_entry(SHRINK, f"gpu:{dev}")
    deadline = spec["deadline"]
    failed = []  # (batch, seq) that ran out of memory
    last = None  # (tokens, seconds of one run)

    def bind(feeds):
        b = sess.io_binding()
        keep = []
        for n, x in feeds.items():
            if device == "cuda":
                v = ort.OrtValue.ortvalue_from_numpy(x, "cuda", dev)
                keep.append(v)
                b.bind_ortvalue_input(n, v)
            else:
                b.bind_cpu_input(n, x)
        return b, keep

    def run_once(feeds, opts=None):
        b, keep = bind(feeds)
        for n in out_names:
            b.bind_output(n, device, dev)
        sess.run_with_iobinding(b, opts)
        outs = b.get_outputs()
        return b, keep, outs

    for batch, seq in spec["points"]:
        pt = {"event": "point", "batch": batch, "seq": seq}
        if any(batch >= fb and seq >= fs for fb, fs in failed):
            emit({**pt, "status": "skipped", "reason": "needs more memory than a point that ran out"})
            continue
        est = 0.0
        if last:
            # Attention grows with S^2 per sequence; assume the worst for the estimate.
            est = last[1] * (batch * seq * seq) / last[0] * (spec["min_iters"] + 2)
        if time.time() + est > deadline:
            emit({**pt, "status": "skipped", "reason": f"time budget (estimated {est:.0f} s)"})
            continue
        feeds = make_feeds(spec["inputs"], spec["vocab"], batch, seq, seed=seq + batch)
        try:
            # Return the free arena regions to the driver so this point's growth is its own.
            b, keep, outs = run_once(make_feeds(spec["inputs"], spec["vocab"], 1, 8), shrink)
            del b, keep, outs
            mem.reset_peak()
            before = mem.used()
            rss_before = proc_status("VmRSS")
            t = time.perf_counter()
            b, keep, outs = run_once(feeds)
            first = time.perf_counter() - t
            peak = mem.used()
            rss_after = proc_status("VmRSS")
            o0 = outs[0]
            # Copying a huge output (LLaMA logits at 32k tokens: GBs) to the host would dominate.
            if spec.get("check_finite") and int(np.prod(o0.shape())) <= 64 * MIB and not np.isfinite(o0.numpy()).all():
                raise RuntimeError("non-finite values in the output")
            for n, o in zip(out_names, outs):
                b.bind_ortvalue_output(n, o)  # reuse the outputs' buffers: no allocation per run
            iters = max(spec["min_iters"], min(spec["max_iters"], int(spec["target_s"] / max(first, 1e-6))))
            if first < 1.0:
                sess.run_with_iobinding(b)
            times = []
            for _ in range(iters):
                t = time.perf_counter()
                sess.run_with_iobinding(b)
                times.append(time.perf_counter() - t)
                if time.time() > deadline and len(times) >= 1:
                    break
            times.sort()
            med = times[len(times) // 2]
            last = (batch * seq * seq, med)
            emit({**pt, "status": "ok", "latency_ms_median": round(med * 1e3, 3), "latency_ms_min": round(times[0] * 1e3, 3),
                  "iters": len(times), "first_run_ms": round(first * 1e3, 1),
                  "peak_mib": round((peak - base) / MIB), "activation_mib": round((peak - before) / MIB),
                  "weights_mib": round(weights / MIB), "host_rss_growth_mib": round((rss_after - rss_before) / MIB),
                  "host_rss_mib": round(rss_after / MIB), "process_rss_at_start_mib": round(rss0 / MIB),
                  "output_shape": list(outs[0].shape())})
            b.clear_binding_outputs()
            del b, keep, outs
        except Exception as e:
            kind = classify(e)
            emit({**pt, "status": kind, "error": str(e).replace("\n", " ")[:500]})
            if kind == "oom":
                failed.append((batch, seq))
    return 0


# ---------------------------------------------------------------------------------------------
# run / maxseq: the parent
# ---------------------------------------------------------------------------------------------

def load_results(path: Path, a) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    meta = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "host": platform.node(),
            "provider": a.provider, "python": platform.python_version()}
    try:
        import onnxruntime as ort

        meta["onnxruntime"] = ort.__version__
    except Exception:
        pass
    if a.provider == "cuda":
        meta["gpu"] = gpu_name()
        meta["gpu_mem_limit_gb"] = a.gpu_mem_limit_gb
    else:
        meta["cpu"] = cpu_name()
    return {"meta": meta, "models": {}, "points": [], "maxseq": [], "events": []}


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0]
    except Exception:
        return "unknown"


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return platform.machine()


def save(path: Path, res: dict):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(path)


def spawn(spec: dict, timeout: float) -> tuple[list, str, int | None]:
    """Runs one child; returns its RESULT records, the tail of its stderr and its exit code
    (None when it was killed at the timeout)."""
    p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "child", json.dumps(spec)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=max(5.0, timeout))
        rc = p.returncode
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        rc = None
    recs = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    return recs, err[-1500:], rc


def selected(doc: dict, a):
    models = a.models.split(",") if a.models else list(doc["models"])
    forms = a.forms_only.split(",") if a.forms_only else list(FORMS)
    for m in models:
        if m not in doc["models"]:
            log(f"warning: model {m!r} is not in forms.json (have: {', '.join(doc['models'])}); skipped")
            continue
        for f in forms:
            info = doc["models"][m]["forms"].get(f)
            if info and info.get("file") and not info.get("error"):
                yield m, f, info


def base_spec(doc, folder, m, f, a, deadline):
    entry = doc["models"][m]
    return {"path": str(folder / entry["forms"][f]["file"]), "provider": a.provider, "device_id": a.device_id,
            "library": a.library if f in OURS else None, "inputs": entry["inputs"],
            "vocab": entry["config"]["vocab_size"], "gpu_mem_limit": int(a.gpu_mem_limit_gb * 2 ** 30) if a.gpu_mem_limit_gb else None,
            "deadline": deadline, "target_s": a.target_s, "min_iters": a.min_iters, "max_iters": a.max_iters,
            "check_finite": True}


def model_meta(doc, m):
    e = doc["models"][m]
    return {k: e.get(k) for k in ("architecture", "exporter", "opset", "attn_implementation", "dtype", "config",
                                  "attention_sites", "onnx_attention_nodes", "parity")} | {
        "forms": {f: {k: v for k, v in info.items() if k in ("file", "fused_sites", "model_type", "tried", "error",
                                                               "optimizer", "skipped", "ops")}
                  for f, info in e["forms"].items()}}


def open_run(a):
    """What `run` and `maxseq` start from: forms.json, its folder, the results file and what it
    already holds."""
    forms_path = Path(a.forms)
    out = Path(a.out)
    return json.loads(forms_path.read_text()), forms_path.parent, out, load_results(out, a)


def cmd_run(a) -> int:
    doc, folder, out, res = open_run(a)
    start = time.time()
    deadline = start + a.budget_s
    points = [(b, s) for b in map(int, a.batches.split(",")) for s in map(int, a.seqs.split(","))]
    points.sort(key=lambda p: (p[0], p[1]))
    for m, f, info in selected(doc, a):
        res["models"][m] = model_meta(doc, m)
        left = deadline - time.time()
        if left < 10:
            have = {(p["batch"], p["seq"]) for p in res["points"] if p["model"] == m and p["form"] == f}
            for b, s in points:
                if (b, s) not in have:
                    res["points"].append({"model": m, "form": f, "batch": b, "seq": s, "status": "skipped",
                                          "reason": "time budget"})
            continue
        spec = base_spec(doc, folder, m, f, a, deadline)
        # Points measured by an earlier call into the same results file are kept, not redone.
        done_before = {(p["batch"], p["seq"]) for p in res["points"]
                       if p["model"] == m and p["form"] == f and p["status"] in ("ok", "oom")}
        todo = [p for p in points if a.redo or p not in done_before]
        if not todo:
            continue
        res["points"] = [p for p in res["points"] if not (p["model"] == m and p["form"] == f
                                                           and (p["batch"], p["seq"]) in set(todo))]
        spec["points"] = todo
        log(f"[{time.time() - start:5.0f}s] {m} / {f}: {len(todo)} points, {left:.0f} s left")
        recs, err, rc = spawn(spec, left + 30)
        done = set()
        for r in recs:
            if r["event"] == "session":
                res["events"].append({"model": m, "form": f, **r})
                continue
            r = {"model": m, "form": f, **{k: v for k, v in r.items() if k != "event"}}
            done.add((r["batch"], r["seq"]))
            res["points"].append(r)
            log(f"    B={r['batch']} S={r['seq']}: {r['status']} "
                + (f"{r['latency_ms_median']} ms, peak {r['peak_mib']} MiB" if r["status"] == "ok" else r.get("reason", r.get("error", ""))[:160]))
        if rc != 0:
            why = "killed at the time budget" if rc is None else f"child exited {rc}: {err.strip()[-400:]}"
            for b, s in todo:
                if (b, s) not in done:
                    res["points"].append({"model": m, "form": f, "batch": b, "seq": s,
                                          "status": "crashed" if rc not in (None, 3) else "skipped", "reason": why})
                    why = "after the crash above" if rc not in (None, 3) else why
            log(f"    {why}")
        save(out, res)
    save(out, res)
    print(out)
    return 0


def cmd_maxseq(a) -> int:
    """Longest S at batch 1: doubling from the largest S known to run, then bisection down to a
    step of --resolution. One child does a whole search; a crash counts as a failure and a
    fresh child goes on from what is known."""
    doc, folder, out, res = open_run(a)
    start = time.time()
    deadline = start + a.budget_s
    for m, f, info in selected(doc, a):
        res["models"].setdefault(m, model_meta(doc, m))
        cap = a.cap
        max_pos = doc["models"][m]["config"].get("max_positions")
        if doc["models"][m]["architecture"] in ("bert_base", "gpt2_small") and max_pos:
            cap = min(cap, max_pos)  # learned absolute positions: the table ends there
        ok = [p["seq"] for p in res["points"] if p["model"] == m and p["form"] == f and p["batch"] == 1 and p["status"] == "ok"]
        bad = [p["seq"] for p in res["points"] if p["model"] == m and p["form"] == f and p["batch"] == 1 and p["status"] == "oom"]
        lo, hi = (max(ok) if ok else 0), (min(bad) if bad else None)
        probes = []
        while time.time() < deadline - 10:
            nxt = next_probe(lo, hi, cap, a.resolution)
            if nxt is None:
                break
            spec = base_spec(doc, folder, m, f, a, deadline)
            spec.update(points=[(1, nxt)], min_iters=1, max_iters=1, target_s=0.0)
            log(f"[{time.time() - start:5.0f}s] {m} / {f}: probe S={nxt} (runs {lo}, fails {hi})")
            recs, err, rc = spawn(spec, deadline - time.time() + 30)
            pts = [r for r in recs if r["event"] == "point"]
            status = pts[0]["status"] if pts else ("timeout" if rc is None else "crashed")
            probes.append({"seq": nxt, "status": status, "peak_mib": pts[0].get("peak_mib") if pts else None,
                           "latency_ms": pts[0].get("latency_ms_median") if pts else None,
                           "error": (pts[0].get("error") if pts else err.strip()[-300:]) or None})
            if status == "ok":
                lo = nxt
            elif status in ("oom", "crashed", "error"):
                hi = nxt
            else:
                break
        verdict = {"model": m, "form": f, "batch": 1, "longest_ok": lo or None, "first_fail": hi,
                   "cap": cap, "resolution": a.resolution, "probes": probes,
                   "complete": next_probe(lo, hi, cap, a.resolution) is None}
        res["maxseq"] = [r for r in res["maxseq"] if not (r["model"] == m and r["form"] == f)] + [verdict]
        log(f"    longest S that runs: {lo} (fails at {hi}, cap {cap})")
        save(out, res)
    print(out)
    return 0


def next_probe(lo: int, hi: int | None, cap: int, resolution: int) -> int | None:
    if hi is None:
        if lo >= cap:
            return None
        return min(cap, max(2 * lo, 128))
    if hi - lo <= resolution:
        return None
    mid = (lo + hi) // 2
    return max(lo + 1, mid - mid % resolution if mid - mid % resolution > lo else mid)


# ---------------------------------------------------------------------------------------------
# table
# ---------------------------------------------------------------------------------------------

def fmt_ms(p):
    if p is None:
        return "—"
    if p["status"] == "ok":
        v = p["latency_ms_median"]
        return f"{v:.1f}" if v >= 10 else f"{v:.2f}"
    return p["status"]


def fmt_gib(p):
    if p is None or p["status"] != "ok":
        return "—"
    return f"{p['peak_mib'] / 1024:.2f}"


def cmd_table(a) -> int:
    res = json.loads(Path(a.results).read_text())
    print(markdown(res))
    return 0


def markdown(res: dict) -> str:
    meta = res["meta"]
    lines = [f"Device: {meta.get('gpu') or meta.get('cpu')}; onnxruntime {meta.get('onnxruntime')}; "
             f"provider {meta['provider']}; {meta['date_utc']} UTC"
             + (f"; arena limit {meta['gpu_mem_limit_gb']} GiB" if meta.get("gpu_mem_limit_gb") else ""), ""]
    if meta.get("note"):
        lines += [meta["note"], ""]
    idx = {(p["model"], p["form"], p["batch"], p["seq"]): p for p in res["points"]}
    for m, info in res["models"].items():
        forms = [f for f in FORMS if f in {p["form"] for p in res["points"] if p["model"] == m}]
        if not forms:
            continue
        cfg = info.get("config", {})
        fused = ", ".join(f"{f}: {(info['forms'].get(f) or {}).get('fused_sites', '—')}" for f in forms if f != "unfused")
        oo = info["forms"].get("ort_opt") or {}
        if "ort_opt" not in forms and oo.get("tried"):
            fused += "; ORT transformer optimizer: " + ", ".join(
                f"{t['model_type']}: {t['fused'] if 'fused' in t else 'error ' + t.get('error', '')[:80]}" for t in oo["tried"])
        of = info["forms"].get("ort_opt_flash") or {}
        ops = (of.get("optimizer") or {}).get("fused_ops")
        if ops:
            fused += (f"; ort_opt_flash: ORT ({of['optimizer']['model_type']}, attention off) fused "
                      + ", ".join(f"{v} {k}" for k, v in ops.items()))
            again = (of.get("optimizer_after_fuse") or {}).get("fused")
            if again:
                fused += ", then after flash-ort " + ", ".join(f"{v} {k}" for k, v in again.items())
        if of.get("skipped") or of.get("error"):
            fused += f"; no ort_opt_flash form: {of.get('skipped') or of.get('error')}"
        lines += [f"### {m}", "",
                  f"{info.get('architecture')}, {cfg.get('num_layers')} layers, hidden {cfg.get('hidden_size')}, "
                  f"{cfg.get('num_attention_heads')} heads ({cfg.get('num_key_value_heads')} KV), {info.get('dtype')}, "
                  f"{info.get('exporter')} opset {info.get('opset')}, attention `{info.get('attn_implementation')}`; "
                  f"attention sites {info.get('attention_sites')}, fused — {fused}"
                  + (f"; the export already has {info['onnx_attention_nodes']} ONNX `Attention` nodes" if info.get("onnx_attention_nodes") else ""),
                  ""]
        par = (info.get("parity") or {}).get("forms")
        if par:
            lines += ["Parity against the unfused export (B=2, one row right-padded, valid positions): " + "; ".join(
                f"{f}: " + (f"rel L2 {r['rel_l2']:.1e}, max abs {r['max_abs']:.2e} {'ok' if r['ok'] else 'FAIL'}"
                            if "rel_l2" in r else f"FAIL {r.get('error', '')[:100]}") for f, r in par.items()), ""]
        # Speed-up of each of our forms against each of ORT's (the issue: >= 2x the unfused export,
        # no slower than ORT's own fused path).
        pairs = [(o, f) for o in OURS if o in forms for f in THEIRS if f in forms]
        head = ["B", "S"] + [f"{f} ms" for f in forms] + [f"{o} speed-up vs {f}" for o, f in pairs]
        head += [f"{f} peak GiB" for f in forms]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        keys = sorted({(p["batch"], p["seq"]) for p in res["points"] if p["model"] == m})
        for b, s in keys:
            row = [str(b), str(s)] + [fmt_ms(idx.get((m, f, b, s))) for f in forms]
            for o, f in pairs:
                ours, theirs = idx.get((m, o, b, s)), idx.get((m, f, b, s))
                ok = ours and theirs and ours["status"] == "ok" and theirs["status"] == "ok"
                row.append(f"{theirs['latency_ms_median'] / ours['latency_ms_median']:.2f}×" if ok else "—")
            row += [fmt_gib(idx.get((m, f, b, s))) for f in forms]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    if res.get("maxseq"):
        lines += ["### Longest sequence that runs (batch 1)", "",
                  "| model | form | longest S that ran | first S that failed | peak GiB at longest | search |", "|---|---|---|---|---|---|"]
        for r in res["maxseq"]:
            okp = [p for p in r["probes"] if p["seq"] == r["longest_ok"] and p["status"] == "ok"] + [
                p for p in res["points"] if (p["model"], p["form"], p["batch"], p["seq"], p["status"])
                == (r["model"], r["form"], 1, r["longest_ok"], "ok")]
            peak = f"{okp[0]['peak_mib'] / 1024:.1f}" if okp and okp[0].get("peak_mib") is not None else "—"
            fail = r["first_fail"] if r["first_fail"] else f"none up to {r['cap']}"
            lines.append(f"| {r['model']} | {r['form']} | {r['longest_ok'] or '—'} | {fail} | {peak} | "
                         f"{'complete' if r['complete'] else 'cut by the time budget'} (±{r['resolution']}) |")
        lines.append("")
    bad = [p for p in res["points"] if p["status"] not in ("ok", "oom", "skipped")]
    if bad:
        # One line per distinct message, with the points it hit.
        groups = {}
        for p in bad:
            msg = f"{p['status']}: {(p.get('error') or p.get('reason') or '')[:200]}"
            groups.setdefault((p["model"], p["form"], msg), []).append(f"B={p['batch']} S={p['seq']}")
        lines += ["Errors:", ""] + [f"- {m} / {f} ({', '.join(pts)}): {msg}" for (m, f, msg), pts in groups.items()] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    root = Path(__file__).resolve().parents[1]
    lib_default = os.environ.get("FLASH_ORT_LIB", str(root / "target" / "release" / "libflash_ort.so"))

    p = sub.add_parser("prepare", help="fuse (flash-ort, ORT optimizer) the exports of a manifest")
    p.add_argument("--manifest", required=True, help="manifest_large.json written by models/export_large.py")
    p.add_argument("--flash-ort", default=os.environ.get("FLASH_ORT_BIN", str(root / "target" / "release" / "flash-ort")))
    p.add_argument("--ort-opt", action="store_true", help="also run ORT's transformer optimizer")
    p.add_argument("--ort-opt-flash", action="store_true",
                   help="also ORT's optimizer with attention fusion off, then flash-ort fuse (form ort_opt_flash)")
    p.add_argument("--nopack", action="store_true",
                   help="with --ort-opt-flash: also the forms ort_opt_flash_pack (fuse --no-fold-bias: Q/K/V "
                        "packed) and ort_opt_flash_nopack (--no-pack-qkv --no-fold-bias), the A/B in one run")
    p.add_argument("--parity", action="store_true", help="run every form against the unfused export in ORT")
    p.add_argument("--library", default=lib_default, help="libflash_ort.so, for --parity")
    p.add_argument("--models", help="comma-separated model names (file stems) or architectures")
    p.add_argument("--provider", choices=("cuda", "cpu"), default="cuda", help="optimizer's use_gpu")
    p.add_argument("--force", action="store_true", help="redo forms already in forms.json")

    for name in ("run", "maxseq"):
        p = sub.add_parser(name)
        p.add_argument("--forms", required=True, help="forms.json written by prepare")
        p.add_argument("--out", required=True, help="results JSON (appended to when it exists)")
        p.add_argument("--models", help="comma-separated model names from forms.json (default: all)")
        p.add_argument("--forms-only", help=f"comma-separated of {','.join(FORMS)}")
        p.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
        p.add_argument("--device-id", type=int, default=0)
        p.add_argument("--library", default=lib_default)
        p.add_argument("--budget-s", type=float, default=300.0, help="wall-clock budget for this command")
        p.add_argument("--gpu-mem-limit-gb", type=float, default=80.0, help="CUDA arena limit in GiB (0: none)")
        p.add_argument("--target-s", type=float, default=1.0, help="seconds of timed runs per point")
        p.add_argument("--min-iters", type=int, default=2)
        p.add_argument("--max-iters", type=int, default=50)
        if name == "run":
            p.add_argument("--seqs", default="128,512,2048,8192,32768")
            p.add_argument("--batches", default="1,8")
            p.add_argument("--redo", action="store_true", help="measure again points the results file already has")
        else:
            p.add_argument("--cap", type=int, default=131072, help="largest S to try")
            p.add_argument("--resolution", type=int, default=1024, help="stop bisecting at this step")

    p = sub.add_parser("table")
    p.add_argument("results")

    p = sub.add_parser("child", help=argparse.SUPPRESS)
    p.add_argument("spec")

    a = ap.parse_args()
    if a.cmd == "child":
        return child(json.loads(a.spec))
    if a.cmd == "prepare":
        if not os.path.exists(a.flash_ort):
            ap.error(f"--flash-ort {a.flash_ort}: no such file")
        if a.parity and not os.path.exists(a.library):
            ap.error(f"--library {a.library}: no such file (needed by --parity)")
        return cmd_prepare(a)
    if a.cmd == "table":
        return cmd_table(a)
    if getattr(a, "library", None) and not os.path.exists(a.library):
        ap.error(f"--library {a.library}: no such file")
    return cmd_run(a) if a.cmd == "run" else cmd_maxseq(a)


if __name__ == "__main__":
    sys.exit(main())
