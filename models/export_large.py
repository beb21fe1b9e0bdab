#!/usr/bin/env python3
"""Export the realistic-size models of the GPU end-to-end benchmark (random weights, not committed).

Same exporters, wrapper, input names and manifest fields as `export.py` (whose helpers it reuses),
at real sizes:

| name | model | layers | hidden | heads (KV) | vocab |
|---|---|---|---|---|---|
| `bert_base` | BertModel | 12 | 768 | 12 | 30522 |
| `gpt2_small` | GPT2LMHeadModel | 12 | 768 | 12 | 50257 |
| `llama_gqa_2k` | LlamaForCausalLM | 16 | 2048 | 32 (8) | 32000 |

BERT and GPT-2 learn absolute positions (512 / 1024 in the released models); the benchmark needs
sequences up to 32k, so `--max-positions` (default 32768) sets the table size; the weights are
random anyway. Files over 2 GB (the LLaMA one in float32) keep their weights in one external-data
file `NAME.onnx.data` beside the model.

Variants are `EXPORTER:IMPL` pairs (`ts17`, `dyn18`, `dyn23` × `eager`, `sdpa`); the default
`ts17:eager,dyn18:sdpa,dyn23:sdpa` gives the graph ORT's optimizer can fuse (TorchScript + eager,
BERT only), the decomposed SDPA graph and the standard ONNX `Attention` graph.

`--dtype float16` exports a half-precision graph directly (the model is moved to the GPU in
float16 for tracing); the default float32 export can be converted later. `--check` runs each file
in ONNX Runtime (CUDA EP when available, else CPU for float32) on a right-padded batch against
PyTorch. `--tiny` shrinks every config to a few layers of width 64 so the whole script can be
smoke-tested on a CPU in seconds.

    python3 models/export_large.py --out bench/out/large [--models bert_base,llama_gqa_2k]
        [--variants ts17:eager,dyn23:sdpa] [--dtype float16] [--check] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import export as small  # noqa: E402  (shared helpers: wrapper, masks, dim names, metadata)

MODELS = ("bert_base", "gpt2_small", "llama_gqa_2k")
DEFAULT_VARIANTS = "ts17:eager,dyn18:sdpa,dyn23:sdpa"
TRACE_BATCH, TRACE_SEQ = 2, 16
CHECK_BATCH, CHECK_SEQ, CHECK_PADDING = 3, 24, [0, 5, 11]
# Weights above this go to one external-data file (protobuf stops at 2 GB).
EXTERNAL_DATA_BYTES = 1_500_000_000


def spec(name, max_positions, tiny):
    import transformers as tf

    if name == "bert_base":
        cfg = tf.BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                            intermediate_size=3072, max_position_embeddings=max_positions)
        s = dict(cls=tf.BertModel, kwargs=dict(add_pooling_layer=False), kind="encoder",
                 inputs=["input_ids", "attention_mask", "token_type_ids"], heads=12, kv_heads=12,
                 layers=12, hidden=768, vocab=30522, sites={"encoder_self": 12})
        if tiny:
            cfg = tf.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128, max_position_embeddings=128)
            s.update(heads=4, kv_heads=4, layers=2, hidden=64, vocab=1000, sites={"encoder_self": 2})
    elif name == "gpt2_small":
        cfg = tf.GPT2Config(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=max_positions,
                            use_cache=False)
        s = dict(cls=tf.GPT2LMHeadModel, kwargs={}, kind="decoder", inputs=["input_ids", "attention_mask"],
                 heads=12, kv_heads=12, layers=12, hidden=768, vocab=50257, sites={"decoder_self_causal": 12})
        if tiny:
            cfg = tf.GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                use_cache=False)
            s.update(heads=4, kv_heads=4, layers=2, hidden=64, vocab=1000, sites={"decoder_self_causal": 2})
    elif name == "llama_gqa_2k":
        cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=max_positions,
                             tie_word_embeddings=False, use_cache=False)
        s = dict(cls=tf.LlamaForCausalLM, kwargs={}, kind="decoder", inputs=["input_ids", "attention_mask"],
                 heads=32, kv_heads=8, layers=16, hidden=2048, vocab=32000, sites={"decoder_self_causal": 16})
        if tiny:
            cfg = tf.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 use_cache=False)
            s.update(heads=4, kv_heads=2, layers=2, hidden=64, vocab=1000, sites={"decoder_self_causal": 2})
    else:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    s["cfg"] = cfg
    s["head_dim"] = s["hidden"] // s["heads"]
    return s


def inputs(s, batch, seq, padding, seed, device):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in s["inputs"]:
        if n == "input_ids":
            out[n] = torch.randint(0, s["vocab"], (batch, seq), generator=g)
        elif n == "attention_mask":
            out[n] = small._mask(batch, seq, padding)
        elif n == "token_type_ids":
            out[n] = torch.randint(0, 2, (batch, seq), generator=g)
    return {k: v.to(device) for k, v in out.items()}


def export_file(wrapper, args, names, exp_key, path, work):
    """Export to `work` (a scratch folder), then write `path` with one external-data file if large."""
    import onnx
    import torch
    from torch.export import Dim

    exporter, opset = small.EXPORTERS[exp_key]
    raw = os.path.join(work, "raw.onnx")
    note = None
    for optimize in (True, False):
        with torch.no_grad():
            if exporter == "torchscript":
                torch.onnx.export(wrapper, args, raw, dynamo=False, opset_version=opset, input_names=names,
                                  output_names=["output"],
                                  dynamic_axes={**{n: small._axes(n) for n in names},
                                                "output": small._output_axes(names)},
                                  do_constant_folding=True)
            else:
                shapes = tuple({k: Dim.DYNAMIC for k in small._axes(n)} for n in names)
                prog = torch.onnx.export(wrapper, args, dynamo=True, opset_version=opset, input_names=names,
                                         output_names=["output"], dynamic_shapes=(shapes,),
                                         external_data=True, optimize=optimize)
                prog.save(raw, external_data=True)
        # The optimizer's ONNX RotaryEmbedding (opset 23) does not run in ORT 1.30/1.31 (see
        # models/README.md), so such a graph is exported again unoptimized.
        if exporter == "torchscript" or not optimize or not _has_onnx_rotary(onnx.load(raw, load_external_data=False)):
            break
        note = "optimize=True wrote ONNX RotaryEmbedding, which ORT cannot run; exported with optimize=False"
        for f in os.listdir(work):
            os.remove(os.path.join(work, f))
    proto = onnx.load(raw)  # with its weights, wherever the exporter put them
    stripped = small._strip_debug_metadata(proto)
    small._name_dynamic_dims(proto, names)
    # Protobuf cannot serialize 2 GB; count the weights rather than asking for the message size.
    big = sum(len(t.raw_data) for t in proto.graph.initializer) > EXTERNAL_DATA_BYTES
    for f in (path, path + ".data"):
        if os.path.exists(f):
            os.remove(f)
    if big:
        onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=os.path.basename(path) + ".data", size_threshold=1024)
    else:
        onnx.save_model(proto, path)
    onnx.checker.check_model(path)  # by path: works for files over 2 GB
    ops = small._op_counts(proto)
    return proto, stripped, big, ops, note


def _has_onnx_rotary(proto):
    return any(n.op_type == "RotaryEmbedding" and n.domain in ("", "ai.onnx") for n in proto.graph.node)


def check(path, wrapper, s, names, device, dtype):
    """Max abs error of ORT against PyTorch at non-padded positions."""
    import numpy as np
    import onnxruntime as ort
    import torch

    feeds = inputs(s, CHECK_BATCH, CHECK_SEQ, CHECK_PADDING, seed=2, device=device)
    with torch.no_grad():
        ref = wrapper(*[feeds[n] for n in names]).float().cpu().numpy()
    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        providers = [("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"]
    elif dtype == "float16":
        return {"skipped": "float16 needs onnxruntime-gpu (CUDA EP) here"}
    sess = ort.InferenceSession(path, providers=providers)
    got = sess.run(None, {n: feeds[n].cpu().numpy() for n in names})[0].astype(np.float32)
    valid = feeds["attention_mask"].cpu().numpy().astype(bool)
    err = float(np.abs(got - ref)[valid].max())
    return {"provider": sess.get_providers()[0], "max_abs_error_vs_torch": err,
            "batch": CHECK_BATCH, "sequence": CHECK_SEQ, "padding_per_row": CHECK_PADDING}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="EXPORTER:IMPL pairs, comma-separated")
    ap.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    ap.add_argument("--max-positions", type=int, default=32768)
    ap.add_argument("--check", action="store_true", help="run each file in ORT against PyTorch")
    ap.add_argument("--tiny", action="store_true", help="tiny configs, for a smoke test of this script")
    a = ap.parse_args()

    import onnx
    import torch
    import transformers

    variants = []
    for v in a.variants.split(","):
        exp_key, _, impl = v.partition(":")
        if exp_key not in small.EXPORTERS or impl not in small.IMPLS:
            ap.error(f"bad variant {v!r}: want EXPORTER:IMPL with EXPORTER in {list(small.EXPORTERS)} "
                     f"and IMPL in {list(small.IMPLS)}")
        variants.append((exp_key, impl))
    device = "cuda" if a.dtype == "float16" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--dtype float16 traces on the GPU, and torch sees none")
    os.makedirs(a.out, exist_ok=True)
    work = os.path.join(a.out, ".work")
    os.makedirs(work, exist_ok=True)
    recs = []
    for name in a.models.split(","):
        for exp_key, impl in variants:
            fname = f"{name}_{impl}_{exp_key}{'_fp16' if a.dtype == 'float16' else ''}.onnx"
            rec = {"file": fname, "architecture": name, "attn_implementation": impl,
                   "exporter": small.EXPORTERS[exp_key][0], "opset": small.EXPORTERS[exp_key][1],
                   "dtype": a.dtype}
            t0 = time.time()
            stage = "build model"
            try:
                torch.manual_seed(0)
                s = spec(name, a.max_positions, a.tiny)
                model = s["cls"]._from_config(s["cfg"], attn_implementation=impl, **s["kwargs"]).eval()
                model = model.to(device=device, dtype=getattr(torch, a.dtype))
                names = s["inputs"]
                wrapper = small._make_wrapper(model, names)
                trace = inputs(s, TRACE_BATCH, TRACE_SEQ, [0, 3], seed=1, device=device)
                stage = f"export {exp_key}"
                path = os.path.join(a.out, fname)
                proto, stripped, big, ops, note = export_file(wrapper, tuple(trace[n] for n in names), names,
                                                        exp_key, path, work)
                ins, outs = small._graph_io(proto)
                rec.update({
                    "status": "ok",
                    "export_options_note": note,
                    "size_bytes": os.path.getsize(path) + (os.path.getsize(path + ".data") if big else 0),
                    "external_data": fname + ".data" if big else None,
                    "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                 "onnx": onnx.__version__, "onnxscript": small._version("onnxscript")},
                    "model_kind": s["kind"],
                    "config": {"hidden_size": s["hidden"], "num_layers": s["layers"],
                               "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"],
                               "head_dim": s["head_dim"], "vocab_size": s["vocab"],
                               "max_positions": a.max_positions if not a.tiny else 128},
                    "attention_sites": sum(s["sites"].values()),
                    "attention_sites_detail": s["sites"],
                    "inputs": ins, "outputs": outs,
                    "stripped_node_metadata": {"keys": list(small.STRIP_METADATA), "entries": stripped},
                    "graph": {"nodes": sum(ops.values()), "softmax_nodes": ops.get("Softmax", 0),
                              "onnx_attention_nodes": ops.get("Attention", 0)},
                })
                for i in rec["inputs"]:
                    if i["name"] == "attention_mask":
                        i.update(role="attention_mask", value_range=[0, 1])
                    elif i["name"] == "input_ids":
                        i.update(role="token_ids", value_range=[0, s["vocab"] - 1],
                                 max_length=rec["config"]["max_positions"])
                    elif i["name"] == "token_type_ids":
                        i.update(role="token_type_ids", value_range=[0, 1])
                if a.check:
                    stage = "onnxruntime check"
                    rec["check"] = check(path, wrapper, s, names, device, a.dtype)
                del model, wrapper, proto
            except Exception as e:
                rec.update(status="failed", stage=stage, error=f"{type(e).__name__}: {e}"[:2000],
                           traceback_tail=traceback.format_exc()[-1500:])
            rec["seconds"] = round(time.time() - t0, 1)
            recs.append(rec)
            msg = (f"ok {rec['size_bytes'] / 2**20:.0f} MiB, sites {rec['attention_sites']}, "
                   f"check {rec.get('check')}" if rec["status"] == "ok"
                   else f"FAILED at {rec['stage']}: {rec['error'][:300]}")
            print(f"{fname}: {msg} ({rec['seconds']} s)", flush=True)
            with open(os.path.join(a.out, "manifest_large.json"), "w") as f:
                json.dump({"generator": "models/export_large.py", "tiny": a.tiny,
                           "models": [r for r in recs if r["status"] == "ok"],
                           "failures": [r for r in recs if r["status"] != "ok"]}, f, indent=1)
    for f in os.listdir(work):
        os.remove(os.path.join(work, f))
    os.rmdir(work)
    return 0 if all(r["status"] == "ok" for r in recs) else 1


if __name__ == "__main__":
    sys.exit(main())
