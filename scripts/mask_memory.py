#!/usr/bin/env python3
"""Peak host memory of fused (and optionally unfused) tiny models from `models/` on ORT's CPU EP
against the sequence length, to check that the fused graphs' memory grows linearly in S.

The tiny exports have 16-entry position tables; for long sequences each model's absolute-position
tables (`*position*` / `wpe` initializers with 16 rows, 18 with an offset of 2, and `arange(16)`
position-id buffers) are
enlarged to the longest S asked for (values tiled: the weights are random anyway). Each
(model, S) point runs once in a fresh child process, which reports its peak RSS (VmHWM) and its
RSS after the session was created; the difference is what the run itself needed.

    .venv/bin/python scripts/mask_memory.py --flash-ort target/release/flash-ort \
        --library target/release/libflash_ort.so [--models llama_gqa_sdpa_dyn18,...] \
        [--seqs 1024,2048,4096,8192] [--unfused] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
DEFAULT_MODELS = (
    "llama_gqa_eager_ts17,llama_gqa_sdpa_dyn18,llama_gqa_sdpa_dyn23,"
    "bert_eager_ts17,bert_sdpa_dyn18,bert_sdpa_dyn23,"
    "gpt2_eager_ts17,gpt2_sdpa_dyn18,gpt2_sdpa_dyn23"
)


def vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def feeds(path: str, seq: int, batch: int) -> dict:
    import onnx

    m = onnx.load(path, load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    out = {}
    for i in m.graph.input:
        if i.name in inits:
            continue
        if i.name in ("input_ids", "decoder_input_ids"):
            out[i.name] = np.random.default_rng(0).integers(0, 32, (batch, seq), dtype=np.int64)
        elif i.name == "attention_mask":
            # Right padding on every other row.
            mask = np.ones((batch, seq), dtype=np.int64)
            mask[1::2, seq - seq // 4 :] = 0
            out[i.name] = mask
        elif i.name == "token_type_ids":
            out[i.name] = np.zeros((batch, seq), dtype=np.int64)
        elif i.name == "position_ids":
            out[i.name] = np.tile(np.arange(seq, dtype=np.int64), (batch, 1))
        else:
            raise SystemExit(f"{path}: no rule to generate input {i.name!r}")
    return out


def child(path: str, seq: int, batch: int, library: str | None, arena: bool) -> None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = arena
    so.intra_op_num_threads = 1
    if library:
        so.register_custom_ops_library(library)
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    f = feeds(path, seq, batch)
    base = vm("VmRSS")
    sess.run(None, f)
    print(json.dumps({"peak": vm("VmHWM"), "base": base}))


def widen_positions(src: Path, dst: Path, rows: int) -> None:
    """Copies a model with its 16-row position tables and arange(16) buffers made `rows` long."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(src))

    def widen(t):
        a = numpy_helper.to_array(t)
        name = t.name.lower()
        # 16 rows, or 18 with BART's / RoBERTa's offset of 2.
        if a.ndim == 2 and a.shape[0] in (16, 18) and ("position" in name or "wpe" in name):
            grown = (rows + a.shape[0] - 16, a.shape[1])
            return numpy_helper.from_array(np.resize(a, grown).astype(a.dtype), t.name)
        if a.ndim == 2 and a.shape == (1, 16) and a.dtype == np.int64 and (a[0] == np.arange(16)).all():
            return numpy_helper.from_array(np.arange(rows, dtype=np.int64)[None, :], t.name)
        return None

    for k, t in enumerate(m.graph.initializer):
        w = widen(t)
        if w is not None:
            m.graph.initializer[k].CopyFrom(w)
    for n in m.graph.node:
        for a in n.attribute:
            if a.HasField("t"):
                w = widen(a.t)
                if w is not None:
                    a.t.CopyFrom(w)
    onnx.save(m, str(dst))


def measure(path: str, seq: int, a) -> dict:
    cmd = [sys.executable, __file__, "--child", path, "--seq", str(seq), "--batch", str(a.batch)]
    if a.library:
        cmd += ["--library", a.library]
    if a.arena:
        cmd += ["--arena"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flash-ort", help="the flash-ort binary that fuses the models")
    ap.add_argument("--library", help="libflash_ort.so")
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--seqs", default="1024,2048,4096,8192")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--unfused", action="store_true", help="also measure the unfused exports")
    ap.add_argument("--arena", action="store_true", help="keep ORT's CPU memory arena on")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.seq, a.batch, a.library, a.arena)
        return
    if not a.flash_ort or not a.library:
        ap.error("--flash-ort and --library are required")
    seqs = [int(s) for s in a.seqs.split(",")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            # Fuse the export as it is, then widen both (only initializers and constants change).
            wide = Path(tmp) / f"{name}.onnx"
            fused = Path(tmp) / f"{name}.fused.onnx"
            subprocess.run(
                [a.flash_ort, "fuse", str(ROOT / "models" / f"{name}.onnx"), "-o", str(fused)],
                check=True,
                capture_output=True,
            )
            widen_positions(fused, fused, max(seqs))
            widen_positions(ROOT / "models" / f"{name}.onnx", wide, max(seqs))
            variants = [("fused", str(fused))] + ([("unfused", str(wide))] if a.unfused else [])
            for kind, path in variants:
                row = {}
                for s in seqs:
                    r = measure(path, s, a)
                    row[s] = r
                    cell = r.get("error") or f"peak {r['peak'] / MIB:.0f} MiB, run {(r['peak'] - r['base']) / MIB:.0f} MiB"
                    print(f"{name:24} {kind:8} S={s:6}: {cell}", flush=True)
                results[f"{name}/{kind}"] = row
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
