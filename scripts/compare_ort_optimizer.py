#!/usr/bin/env python3
"""Count the attention sites that ONNX Runtime's transformer optimizer and `flash-ort fuse` fuse.

Needs onnx, onnxruntime and sympy (the optimizer's shape inference). Both tools run on the same files: every model in models/manifest.json. For ORT's optimizer
(`onnxruntime.transformers.optimizer.optimize_model`) each applicable model type is tried at
opt_level 0 and 1 and the best result is kept (fused = com.microsoft Attention /
MultiHeadAttention / GroupQueryAttention / ... nodes in the result). For flash-ort (when
`--flash-ort PATH` is given) `fuse IN -o OUT` runs and fused = com.flash FlashAttention nodes in OUT.
Each rewritten model is also run in ORT (CPU) against the original on the manifest's padded example
inputs, comparing non-padded positions, so a fusion that changes the result shows as a mismatch.

    python scripts/compare_ort_optimizer.py [--models models] [--flash-ort target/release/flash-ort]
        [--library target/release/libflash_ort.so] [--markdown models/ORT_OPTIMIZER_COMPARISON.md]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort

# com.microsoft ops that hold a whole attention computation.
ORT_ATTENTION_OPS = {
    "Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
    "PackedMultiHeadAttention", "DecoderAttention", "DecoderMaskedMultiHeadAttention",
    "DecoderMaskedSelfAttention", "SparseAttention", "PagedAttention", "LongformerAttention",
    "QAttention", "QOrderedAttention",
}

# optimize_model types that fit each architecture, most specific first. ORT has no LLaMA/Mistral
# type in optimize_model (its LLaMA path is a separate export tool), so the decoder types closest
# to them are tried.
MODEL_TYPES = {
    "bert": ["bert"], "roberta": ["bert"], "distilbert": ["bert"], "vit": ["vit", "bert"],
    "gpt2": ["gpt2"], "llama_gqa": ["qwen3", "gpt2", "bert"], "mistral_swa": ["qwen3", "gpt2", "bert"],
    "t5": ["t5"], "bart": ["bart"],
}
OPT_LEVELS = (0, 1)
TOLERANCE = 1e-4


def count_ops(model: onnx.ModelProto, domain: str, ops) -> int:
    """Nodes of `domain` whose op_type is in `ops`, in the graph, its subgraphs and functions."""
    n = 0

    def walk(nodes):
        nonlocal n
        for node in nodes:
            if node.domain == domain and node.op_type in ops:
                n += 1
            for a in node.attribute:
                if a.HasField("g"):
                    walk(a.g.node)
                for g in a.graphs:
                    walk(g.node)

    walk(model.graph.node)
    for f in model.functions:
        walk(f.node)
    return n


def make_feeds(rec: dict, seed: int = 0) -> tuple[dict, np.ndarray | None]:
    """Inputs that respect the manifest: ids in range, the example padded mask, pixels N(0,1).

    Returns the feeds and a [batch, seq] bool array of positions whose outputs are meaningful
    (None when every position is).
    """
    rng = np.random.default_rng(seed)
    mask = rec.get("example_attention_mask")
    check = rec.get("check", {})
    batch = len(mask) if mask else check.get("batch", 2)
    sizes = {"batch": batch, "sequence": len(mask[0]) if mask else check.get("sequence", 8),
             "decoder_sequence": check.get("decoder_sequence") or 7}
    feeds = {}
    for i in rec["inputs"]:
        shape = [sizes[d] if isinstance(d, str) else d for d in i["shape"]]
        role = i.get("role")
        if role == "attention_mask":
            feeds[i["name"]] = np.array(mask, dtype=np.int64)
        elif role in ("token_ids", "token_type_ids"):
            lo, hi = i["value_range"]
            feeds[i["name"]] = rng.integers(lo, hi + 1, size=shape, dtype=np.int64)
        elif role == "pixel_values":
            feeds[i["name"]] = rng.standard_normal(shape).astype(np.float32)
        else:
            raise ValueError(f"{rec['file']}: input {i['name']} has no role in the manifest")
    valid = None
    if mask and rec.get("model_kind") in ("encoder", "decoder"):
        valid = np.array(mask, dtype=bool)
    return feeds, valid


def run_model(model, feeds, library=None):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if library:
        so.register_custom_ops_library(library)
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def parity(ref, got, valid) -> str:
    if got.shape != ref.shape:
        return f"shape {got.shape} != {ref.shape}"
    d = np.abs(got.astype(np.float64) - ref)
    if valid is not None:
        d = d[valid]
    err = float(np.nanmax(d)) if np.isfinite(d).all() else float("nan")
    return f"ok ({err:.0e})" if err <= TOLERANCE else f"MISMATCH ({err:.2g})"


def ort_optimizer(path: str, rec: dict, feeds, valid, ref) -> dict:
    """Best attention-fusion count over the applicable model types and opt levels."""
    from onnxruntime.transformers import optimizer

    cfg = rec["config"]
    best, tried = None, []
    for model_type in MODEL_TYPES[rec["architecture"]]:
        for level in OPT_LEVELS:
            label = f"{model_type}/o{level}"
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    opt = optimizer.optimize_model(path, model_type=model_type,
                                                   num_heads=cfg["num_attention_heads"],
                                                   hidden_size=cfg["hidden_size"], opt_level=level)
                m = opt.model
                fused = count_ops(m, "com.microsoft", ORT_ATTENTION_OPS)
                res = {"config": label, "fused": fused}
                if fused:
                    try:
                        res["parity"] = parity(ref, run_model(m, feeds), valid)
                    except Exception as e:  # a fused graph ORT itself cannot run
                        res["parity"] = f"does not run: {str(e).splitlines()[0][:120]}"
            except Exception as e:
                res = {"config": label, "fused": None, "error": f"{type(e).__name__}: {str(e)[:150]}"}
            tried.append(res)
            if res.get("fused") is not None and (best is None or res["fused"] > best["fused"]):
                best = res
    return {"best": best, "tried": tried}


def flash_ort(binary: str, path: str, feeds, valid, ref, library) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "fused.onnx")
        p = subprocess.run([binary, "fuse", path, "-o", out], capture_output=True, text=True, timeout=300)
        if p.returncode != 0:
            return {"fused": None, "error": f"exit {p.returncode}: {(p.stderr or p.stdout).strip()[:200]}"}
        m = onnx.load(out)
        res = {"fused": count_ops(m, "com.flash", {"FlashAttention"})}
        if library and res["fused"]:
            try:
                res["parity"] = parity(ref, run_model(m, feeds, library), valid)
            except Exception as e:
                res["parity"] = f"does not run: {str(e).splitlines()[0][:120]}"
        return res


def main() -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=os.path.join(root, "models"), help="folder with manifest.json")
    ap.add_argument("--flash-ort", help="path of the flash-ort binary (column says n/a without it)")
    ap.add_argument("--library", help="libflash_ort.so for running flash-ort's output "
                    "(default: beside the binary, if there)")
    ap.add_argument("--only", default="", help="substring a file name must contain")
    ap.add_argument("--markdown", help="also write the table and details to this file")
    ap.add_argument("--json", help="write every measurement as JSON to this file")
    ap.add_argument("--note", help="where the flash-ort binary came from (printed in the markdown)")
    a = ap.parse_args()
    logging.disable(logging.WARNING)  # the optimizer logs every skipped fusion

    with open(os.path.join(a.models, "manifest.json")) as f:
        manifest = json.load(f)
    binary = a.flash_ort
    if binary and not os.path.exists(binary):
        ap.error(f"--flash-ort {binary}: no such file")
    library = a.library
    if binary and not library:
        cand = os.path.join(os.path.dirname(os.path.abspath(binary)), "libflash_ort.so")
        library = cand if os.path.exists(cand) else None

    rows, results = [], []
    totals = {"sites": 0, "ort": 0, "flash": 0, "files": 0, "ort_full": 0, "flash_full": 0}
    t0 = time.time()
    for rec in manifest["models"]:
        if a.only not in rec["file"]:
            continue
        path = os.path.join(a.models, rec["file"])
        feeds, valid = make_feeds(rec)
        ref = run_model(path, feeds).astype(np.float64)
        o = ort_optimizer(path, rec, feeds, valid, ref)
        fl = flash_ort(binary, path, feeds, valid, ref, library) if binary else None
        sites = rec["attention_sites"]
        best = o["best"]
        ort_cell = (f"error ({o['tried'][0]['error'][:60]})" if best is None
                    else f"{best['fused']} ({best['config']})")
        ort_par = (best or {}).get("parity", "—") if best and best["fused"] else "—"
        if fl is None:
            fl_cell, fl_par = "n/a", "n/a"
        elif fl["fused"] is None:
            fl_cell, fl_par = f"error: {fl['error'][:80]}", "—"
        else:
            fl_cell, fl_par = str(fl["fused"]), fl.get("parity", "not run" if fl["fused"] else "—")
        onnx_attn = rec["graph"]["onnx_attention_nodes"]
        rows.append((rec["file"], sites, onnx_attn, ort_cell, ort_par, fl_cell, fl_par))
        results.append({"file": rec["file"], "sites": sites, "onnx_attention_in_export": onnx_attn,
                        "ort_optimizer": o, "flash_ort": fl})
        totals["files"] += 1
        totals["sites"] += sites
        ort_n = best["fused"] if best else 0
        totals["ort"] += ort_n
        totals["ort_full"] += ort_n == sites
        if fl and fl["fused"] is not None:
            totals["flash"] += fl["fused"]
            totals["flash_full"] += fl["fused"] == sites
        print(f"{rec['file']:32} sites {sites}  ORT {ort_cell:14} {ort_par:18}  flash-ort {fl_cell} {fl_par}",
              flush=True)

    head = ("| model | sites | ONNX `Attention` in export | ORT optimizer fused (best type/opt_level) "
            "| ORT parity | flash-ort fused | flash-ort parity |")
    lines = [head, "|" + "---|" * 7]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    flash_total = (f"{totals['flash']} / {totals['sites']} sites, {totals['flash_full']} / {totals['files']} "
                   f"models fully fused" if binary else "n/a (no --flash-ort binary given)")
    summary = [
        f"- ORT transformer optimizer (onnxruntime {ort.__version__}): {totals['ort']} / {totals['sites']} "
        f"sites, {totals['ort_full']} / {totals['files']} models fully fused.",
        f"- flash-ort: {flash_total}.",
    ]
    print("\n".join(summary))
    print(f"({time.time() - t0:.0f} s)")
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(MD_HEAD.format(ort=ort.__version__, cmd=shlex.join(["python"] + sys.argv)))
            if binary:
                v = subprocess.run([binary, "version"], capture_output=True, text=True).stdout.strip()
                f.write(f"flash-ort: `{v.splitlines()[0] if v else binary}`"
                        f"{' — ' + a.note if a.note else ''}.\n\n")
            f.write("\n".join(summary) + "\n\n" + "\n".join(lines) + "\n" + MD_TAIL)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


MD_HEAD = """# Attention fusion: ONNX Runtime's transformer optimizer vs flash-ort

Made by `scripts/compare_ort_optimizer.py` on the files in `models/` (see `models/manifest.json`),
both tools on the same files, onnxruntime {ort}, CPU:

    {cmd}

*sites*: attention blocks in the model (layers × self / causal self / cross). *ORT optimizer
fused*: com.microsoft `Attention` / `MultiHeadAttention` / `GroupQueryAttention` nodes after
`optimize_model`, best over the applicable model types (`bert`, `vit`, `gpt2`, `t5`, `bart`; for
LLaMA/Mistral `qwen3`, `gpt2`, `bert`) at opt_level 0 and 1. *parity*: the rewritten model against
the original in ORT on the manifest's right-padded example batch, max abs error over non-padded
positions (tolerance 1e-4). *ONNX `Attention` in export*: standard `Attention` nodes the dynamo
exporter already wrote (opset 23, sdpa); ORT runs them natively but its optimizer does not count
them as fusions.

"""

MD_TAIL = """
Not counted as a fusion: a model type whose optimizer ran but produced no attention node, and the
standard ONNX `Attention` nodes that were in the export already.
"""

if __name__ == "__main__":
    sys.exit(main())
