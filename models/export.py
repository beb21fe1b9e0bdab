#!/usr/bin/env python3
"""Export the tiny test models of flash-ort with torch.onnx and transformers.

Every model is a real Hugging Face architecture with a tiny config and random weights (seeded),
exported with `attn_implementation` "eager" and "sdpa" (where transformers allows it) through the
TorchScript exporter (opset 17) and the dynamo exporter (opsets 18 and 23). Each export is checked
with `onnx.checker` and run in ONNX Runtime (CPU) on a padded batch of a different shape than the
one it was traced with, against the PyTorch model, before it is kept. Every export that fails is
recorded in the manifest with its error instead of being dropped silently.

Usage (needs torch, transformers, onnx, onnxscript, onnxruntime; no network):
    python models/export.py --out models [--jobs 8] [--only bert,gpt2] [--exporters ts17,dyn18,dyn23]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import sys
import time
import traceback

# Shapes used for tracing and for checking. They differ so that a dimension wrongly frozen at
# trace time shows up as an ORT failure instead of passing unnoticed.
TRACE_BATCH, TRACE_SEQ, TRACE_DEC_SEQ = 2, 8, 5
CHECK_BATCH, CHECK_SEQ, CHECK_DEC_SEQ = 3, 12, 7
IMAGE_SIZE = 32
# Tokens removed from the end of each checked row: row 0 full, the others right-padded.
CHECK_PADDING = [0, 3, 5]
TRACE_PADDING = [0, 3]

EXPORTERS = {
    "ts17": ("torchscript", 17),
    "dyn18": ("dynamo", 18),
    "dyn23": ("dynamo", 23),
}
IMPLS = ("eager", "sdpa")
VOCAB, MAX_POSITIONS = 32, 16

# Tolerance for ORT vs PyTorch on the same fp32 inputs (tiny models, values O(1)).
ATOL = 1e-4


def _spec(arch):
    """Tiny config, model class, inputs and attention-site layout of one architecture."""
    import transformers as tf

    # Sizes keep the 54 files near 6 MB together: most bytes are the attention weights
    # (hidden 32 = 2 heads x 16, the smallest that still has a real head dim), so the embeddings
    # (vocab 32, 16 positions) and the MLP (width 16) are cut to the bone.
    V, P, F = VOCAB, MAX_POSITIONS, 16
    if arch == "bert":
        cfg = tf.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=F, max_position_embeddings=P, type_vocab_size=2)
        return dict(cls=tf.BertModel, cfg=cfg, kind="encoder", kwargs=dict(add_pooling_layer=False),
                    inputs=["input_ids", "attention_mask", "token_type_ids"],
                    sites={"encoder_self": 2}, heads=2, kv_heads=2, head_dim=16, hidden=32)
    if arch == "roberta":
        cfg = tf.RobertaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=F, max_position_embeddings=P + 2, type_vocab_size=1,
                               pad_token_id=1)
        return dict(cls=tf.RobertaModel, cfg=cfg, kind="encoder", kwargs=dict(add_pooling_layer=False),
                    inputs=["input_ids", "attention_mask"],
                    sites={"encoder_self": 2}, heads=2, kv_heads=2, head_dim=16, hidden=32)
    if arch == "distilbert":
        cfg = tf.DistilBertConfig(vocab_size=V, dim=32, n_layers=2, n_heads=2, hidden_dim=F,
                                  max_position_embeddings=P)
        return dict(cls=tf.DistilBertModel, cfg=cfg, kind="encoder", kwargs={},
                    inputs=["input_ids", "attention_mask"],
                    sites={"encoder_self": 2}, heads=2, kv_heads=2, head_dim=16, hidden=32)
    if arch == "vit":
        cfg = tf.ViTConfig(image_size=IMAGE_SIZE, patch_size=8, num_channels=3, hidden_size=32,
                           num_hidden_layers=2, num_attention_heads=2, intermediate_size=F)
        return dict(cls=tf.ViTModel, cfg=cfg, kind="vision", kwargs=dict(add_pooling_layer=False),
                    inputs=["pixel_values"],
                    sites={"encoder_self": 2}, heads=2, kv_heads=2, head_dim=16, hidden=32)
    if arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_inner=F, n_positions=P,
                            use_cache=False)
        return dict(cls=tf.GPT2LMHeadModel, cfg=cfg, kind="decoder", kwargs={},
                    inputs=["input_ids", "attention_mask"],
                    sites={"decoder_self_causal": 2}, heads=2, kv_heads=2, head_dim=16, hidden=32)
    if arch == "llama_gqa":
        cfg = tf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=F, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             max_position_embeddings=P, tie_word_embeddings=True, use_cache=False)
        return dict(cls=tf.LlamaForCausalLM, cfg=cfg, kind="decoder", kwargs={},
                    inputs=["input_ids", "attention_mask"],
                    sites={"decoder_self_causal": 2}, heads=4, kv_heads=2, head_dim=16, hidden=32)
    if arch == "mistral_swa":
        # sliding_window (4) is smaller than every traced and checked sequence (8, 12).
        cfg = tf.MistralConfig(vocab_size=V, hidden_size=32, intermediate_size=F, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               max_position_embeddings=P, sliding_window=4, tie_word_embeddings=True,
                               use_cache=False)
        return dict(cls=tf.MistralForCausalLM, cfg=cfg, kind="decoder", kwargs={},
                    inputs=["input_ids", "attention_mask"],
                    sites={"decoder_self_causal_sliding_window": 2}, heads=4, kv_heads=2, head_dim=16,
                    hidden=32, sliding_window=4)
    if arch == "t5":
        cfg = tf.T5Config(vocab_size=V, d_model=32, d_kv=16, d_ff=F, num_layers=2, num_decoder_layers=2,
                          num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                          decoder_start_token_id=0, pad_token_id=0, use_cache=False)
        return dict(cls=tf.T5Model, cfg=cfg, kind="encoder_decoder", kwargs={},
                    inputs=["input_ids", "attention_mask", "decoder_input_ids"],
                    sites={"encoder_self": 2, "decoder_self_causal": 2, "decoder_cross": 2},
                    heads=2, kv_heads=2, head_dim=16, hidden=32)
    if arch == "bart":
        cfg = tf.BartConfig(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2,
                            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=F,
                            decoder_ffn_dim=F, max_position_embeddings=P, use_cache=False)
        return dict(cls=tf.BartModel, cfg=cfg, kind="encoder_decoder", kwargs={},
                    inputs=["input_ids", "attention_mask", "decoder_input_ids"],
                    sites={"encoder_self": 2, "decoder_self_causal": 2, "decoder_cross": 2},
                    heads=2, kv_heads=2, head_dim=16, hidden=32)
    raise ValueError(f"unknown architecture {arch!r}")


ARCHS = ("bert", "roberta", "distilbert", "vit", "gpt2", "llama_gqa", "mistral_swa", "t5", "bart")


def _make_wrapper(model, names):
    """A module whose forward takes the named tensors positionally and returns one tensor."""
    import torch

    class ExportWrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *args):
            kw = dict(zip(names, args))
            out = self.model(**kw, return_dict=True)
            # Decoders: logits; encoders and encoder-decoders: the last hidden state.
            return out.logits if hasattr(out, "logits") else out.last_hidden_state

    return ExportWrapper().eval()


def _mask(batch, seq, padding):
    import torch

    m = torch.ones(batch, seq, dtype=torch.int64)
    for row, pad in enumerate(padding[:batch]):
        if pad:
            m[row, seq - pad:] = 0
    return m


def _inputs(spec, batch, seq, dec_seq, padding, seed):
    """Inputs in valid ranges: ids in [0, vocab), masks right-padded, pixels N(0,1)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in spec["inputs"]:
        if name == "input_ids":
            out[name] = torch.randint(2, VOCAB, (batch, seq), generator=g)
        elif name == "decoder_input_ids":
            out[name] = torch.randint(2, VOCAB, (batch, dec_seq), generator=g)
        elif name == "attention_mask":
            out[name] = _mask(batch, seq, padding)
        elif name == "token_type_ids":
            out[name] = torch.randint(0, 2, (batch, seq), generator=g)
        elif name == "pixel_values":
            out[name] = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
        else:
            raise ValueError(name)
    return out


def _axes(name):
    if name == "pixel_values":
        return {0: "batch"}
    if name == "decoder_input_ids":
        return {0: "batch", 1: "decoder_sequence"}
    return {0: "batch", 1: "sequence"}


def _output_axes(names):
    if "pixel_values" in names:
        return {0: "batch"}
    if "decoder_input_ids" in names:
        return {0: "batch", 1: "decoder_sequence"}
    return {0: "batch", 1: "sequence"}


def _input_doc(name, spec):
    """What the manifest says about one input: its role and the values it may hold."""
    if name in ("input_ids", "decoder_input_ids"):
        return {"role": "token_ids", "value_range": [0, VOCAB - 1],
                "max_length": MAX_POSITIONS}
    if name == "attention_mask":
        return {"role": "attention_mask", "value_range": [0, 1],
                "semantics": "1 = real token, 0 = padding (right padding in the example)"}
    if name == "token_type_ids":
        return {"role": "token_type_ids", "value_range": [0, 1]}
    if name == "pixel_values":
        return {"role": "pixel_values", "value_range": "float, normalized image (any real value)",
                "shape_note": f"[batch, 3, {IMAGE_SIZE}, {IMAGE_SIZE}]"}
    return {}


def _graph_io(model_proto):
    def dims(t):
        return [d.dim_param if d.dim_param else d.dim_value for d in t.type.tensor_type.shape.dim]

    import onnx

    init = {i.name for i in model_proto.graph.initializer}
    ins = [{"name": i.name, "dtype": onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type).lower(),
            "shape": dims(i)} for i in model_proto.graph.input if i.name not in init]
    outs = [{"name": o.name, "dtype": onnx.TensorProto.DataType.Name(o.type.tensor_type.elem_type).lower(),
             "shape": dims(o)} for o in model_proto.graph.output]
    return ins, outs


def _op_counts(model_proto):
    """Node counts by (domain, op) over the main graph, its subgraphs and local functions."""
    counts = {}

    def walk(nodes):
        for n in nodes:
            key = f"{n.domain + '.' if n.domain else ''}{n.op_type}"
            counts[key] = counts.get(key, 0) + 1
            for a in n.attribute:
                if a.HasField("g"):
                    walk(a.g.node)
                for g in a.graphs:
                    walk(g.node)

    walk(model_proto.graph.node)
    for f in model_proto.functions:
        walk(f.node)
    return dict(sorted(counts.items()))


# Per-node debug text that the dynamo exporter writes: Python stack traces (with this machine's
# paths), FX node dumps and the module path spelled three ways. Together they triple the file size
# and say nothing about the computation, so they are dropped (node names keep the module path).
STRIP_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node", "namespace",
                  "pkg.torch.onnx.class_hierarchy", "pkg.torch.onnx.name_scopes")


def _name_dynamic_dims(model_proto, names):
    """Give the dynamic axes the same names in every export ("batch", "sequence", ...).

    The dynamo exporter names them after its internal symbols (s33, s50) and may give the batch
    axis of two inputs two symbols; the names are renamed everywhere they appear.
    """
    rename = {}
    inputs = {i.name: i for i in model_proto.graph.input}
    for n in names:
        dims = inputs[n].type.tensor_type.shape.dim
        for axis, new in _axes(n).items():
            old = dims[axis].dim_param
            if old and old != new:
                rename[old] = new
    for v in list(model_proto.graph.input) + list(model_proto.graph.output) + list(model_proto.graph.value_info):
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param in rename:
                d.dim_param = rename[d.dim_param]


def _strip_debug_metadata(model_proto):
    """Remove STRIP_METADATA entries from every node; returns how many were removed."""
    removed = 0

    def walk(nodes):
        nonlocal removed
        for n in nodes:
            keep = [p for p in n.metadata_props if p.key not in STRIP_METADATA]
            if len(keep) != len(n.metadata_props):
                removed += len(n.metadata_props) - len(keep)
                del n.metadata_props[:]
                n.metadata_props.extend(keep)
            for a in n.attribute:
                if a.HasField("g"):
                    walk(a.g.node)
                for g in a.graphs:
                    walk(g.node)

    walk(model_proto.graph.node)
    for f in model_proto.functions:
        walk(f.node)
    return removed


def export_one(job):
    """Export, check and describe one (arch, impl, exporter) combination. Never raises."""
    arch, impl, exp_key, out_dir = job
    exporter, opset = EXPORTERS[exp_key]
    fname = f"{arch}_{impl}_{exp_key}.onnx"
    rec = {"file": fname, "architecture": arch, "attn_implementation": impl, "exporter": exporter,
           "opset": opset}
    failed_first = None
    t0 = time.time()
    stage = "setup"
    try:
        import numpy as np
        import onnx
        import onnxruntime as ort
        import torch
        import transformers

        torch.set_num_threads(1)
        torch.manual_seed(0)
        spec = _spec(arch)
        rec["hf_class"] = spec["cls"].__name__
        stage = "build model"
        try:
            model = spec["cls"]._from_config(spec["cfg"], attn_implementation=impl, **spec["kwargs"])
        except TypeError:
            spec["cfg"]._attn_implementation = impl
            model = spec["cls"](spec["cfg"], **spec["kwargs"])
        model.eval()
        actual = getattr(model.config, "_attn_implementation", None)
        if actual != impl:
            raise RuntimeError(f"asked for attn_implementation={impl!r}, model uses {actual!r}")
        names = spec["inputs"]
        wrapper = _make_wrapper(model, names)
        trace = _inputs(spec, TRACE_BATCH, TRACE_SEQ, TRACE_DEC_SEQ, TRACE_PADDING, seed=1)
        args = tuple(trace[n] for n in names)
        path = os.path.join(out_dir, fname)
        tmp = path + ".tmp"
        check = _inputs(spec, CHECK_BATCH, CHECK_SEQ, CHECK_DEC_SEQ, CHECK_PADDING, seed=2)
        with torch.no_grad():
            ref = wrapper(*[check[n] for n in names]).float().numpy()
        # The dynamo exporter's default graph optimization is tried first; if ORT cannot run or
        # mis-computes its result, the unoptimized export is tried and the first error recorded.
        options = [{"optimize": True}, {"optimize": False}] if exporter == "dynamo" else [{}]
        for k, opts in enumerate(options):
            try:
                stage = f"export ({exporter}, opset {opset}, {opts or 'defaults'})"
                _export(wrapper, args, names, exporter, opset, tmp, opts)
                stage = "onnx.checker"
                proto = onnx.load(tmp)
                stripped = _strip_debug_metadata(proto)
                _name_dynamic_dims(proto, names)
                onnx.save(proto, tmp)
                onnx.checker.check_model(proto, full_check=True)
                stage = "onnxruntime check"
                errs = _check(tmp, names, check, ref, spec)
                break
            except Exception as e:
                if k + 1 == len(options) or stage.startswith("export"):
                    raise
                failed_first = dict(rec, status="failed", stage=stage, export_options=opts,
                                    error=f"{type(e).__name__}: {e}"[:2000],
                                    retried_with=options[k + 1])
                rec["export_options_note"] = (f"default export failed at {stage} "
                                              f"({type(e).__name__}: {str(e)[:300]}); kept {options[k + 1]}")
        rec["export_options"] = opts
        os.replace(tmp, path)
        ins, outs = _graph_io(proto)
        for i in ins:
            i.update(_input_doc(i["name"], spec))
        ops = _op_counts(proto)
        n_sites = sum(spec["sites"].values())
        rec.update({
            "status": "ok",
            "size_bytes": os.path.getsize(path),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                         "onnxscript": _version("onnxscript"), "python": sys.version.split()[0]},
            "model_kind": spec["kind"],
            "config": {"hidden_size": spec["hidden"], "num_layers": 2, "num_attention_heads": spec["heads"],
                       "num_key_value_heads": spec["kv_heads"], "head_dim": spec["head_dim"],
                       "vocab_size": VOCAB if arch != "vit" else None,
                       "sliding_window": spec.get("sliding_window"),
                       "max_positions": MAX_POSITIONS if arch != "vit" else None,
                       "hf_config": _small_config(spec["cfg"])},
            "attention_sites": n_sites,
            "attention_sites_detail": spec["sites"],
            "inputs": ins,
            "outputs": outs,
            "example_attention_mask": (_mask(CHECK_BATCH, CHECK_SEQ, CHECK_PADDING).tolist()
                                       if "attention_mask" in names else None),
            "stripped_node_metadata": {"keys": list(STRIP_METADATA), "entries": stripped},
            "graph": {"nodes": sum(ops.values()), "softmax_nodes": ops.get("Softmax", 0),
                      "onnx_attention_nodes": ops.get("Attention", 0), "op_counts": ops,
                      "functions": len(proto.functions), "ir_version": proto.ir_version},
            "check": {"batch": CHECK_BATCH, "sequence": CHECK_SEQ,
                      "decoder_sequence": CHECK_DEC_SEQ if "decoder_input_ids" in names else None,
                      "padding_per_row": CHECK_PADDING if "attention_mask" in names else None,
                      **errs},
        })
    except Exception as e:  # recorded in the manifest, never hidden
        rec.update({"status": "failed", "stage": stage, "error": f"{type(e).__name__}: {e}"[:2000],
                    "traceback_tail": traceback.format_exc()[-1500:]})
        for p in (os.path.join(out_dir, fname + ".tmp"),):
            if os.path.exists(p):
                os.remove(p)
    rec["seconds"] = round(time.time() - t0, 1)
    return [r for r in (failed_first, rec) if r is not None]


def _export(wrapper, args, names, exporter, opset, path, opts):
    import torch

    with torch.no_grad():
        if exporter == "torchscript":
            torch.onnx.export(wrapper, args, path, dynamo=False, opset_version=opset,
                              input_names=names, output_names=["output"],
                              dynamic_axes={**{n: _axes(n) for n in names}, "output": _output_axes(names)},
                              do_constant_folding=True)
        else:
            from torch.export import Dim

            shapes = tuple({k: Dim.DYNAMIC for k in _axes(n)} for n in names)
            prog = torch.onnx.export(wrapper, args, dynamo=True, opset_version=opset,
                                     input_names=names, output_names=["output"],
                                     dynamic_shapes=(shapes,), external_data=False, **opts)
            prog.save(path, external_data=False)


def _check(path, names, feeds, ref, spec):
    """Run the file in ORT (CPU) and compare with PyTorch.

    Outputs at padded query positions are excluded from the pass/fail error (they are garbage by
    definition and, where a sliding window leaves a padded query no visible key, implementations
    legitimately differ), but their error is reported.
    """
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    got = sess.run(None, {n: feeds[n].numpy() for n in names})[0]
    if got.shape != ref.shape:
        raise RuntimeError(f"ORT output shape {got.shape} != torch {ref.shape}")
    valid = np.ones(got.shape[:2], dtype=bool)
    if "attention_mask" in names and spec["kind"] in ("encoder", "decoder"):
        valid = feeds["attention_mask"].numpy().astype(bool)
    diff = np.abs(got - ref)
    if not np.isfinite(got[valid]).all():
        raise RuntimeError("ORT output has NaN/Inf at non-padded positions")
    err = float(diff[valid].max())
    if err > ATOL:
        raise RuntimeError(f"ORT vs torch max abs error {err:.3g} > {ATOL} at non-padded positions")
    pad = diff[~valid]
    return {"max_abs_error_vs_torch": err,
            "padded_positions_max_abs_error": float(np.nanmax(pad)) if pad.size else None,
            "padded_positions_nan_count": int(np.isnan(got[~valid]).sum())}


def _version(mod):
    try:
        return __import__(mod).__version__
    except Exception:
        return None


def _small_config(cfg):
    d = cfg.to_diff_dict() if hasattr(cfg, "to_diff_dict") else cfg.to_dict()
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool, type(None)))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the .onnx files and manifest.json")
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    ap.add_argument("--only", default="", help="comma-separated architectures (default: all)")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--exporters", default=",".join(EXPORTERS))
    a = ap.parse_args()
    archs = [x for x in a.only.split(",") if x] or list(ARCHS)
    for x in archs:
        if x not in ARCHS:
            ap.error(f"unknown architecture {x!r}; known: {', '.join(ARCHS)}")
    os.makedirs(a.out, exist_ok=True)
    jobs = [(arch, impl, e, a.out) for arch in archs for impl in a.impls.split(",")
            for e in a.exporters.split(",")]
    t0 = time.time()
    recs = []
    # spawn, not fork: each worker imports torch itself, with no thread pool inherited.
    with cf.ProcessPoolExecutor(max_workers=a.jobs, mp_context=mp.get_context("spawn")) as pool:
        futs = {pool.submit(export_one, j): j for j in jobs}
        for i, f in enumerate(cf.as_completed(futs), 1):
            try:
                rs = f.result()
            except Exception as e:  # a worker that died (not an export error)
                arch, impl, e_key, _ = futs[f]
                rs = [{"file": f"{arch}_{impl}_{e_key}.onnx", "architecture": arch, "attn_implementation": impl,
                       "exporter": EXPORTERS[e_key][0], "opset": EXPORTERS[e_key][1], "status": "failed",
                       "stage": "worker", "error": f"{type(e).__name__}: {e}"}]
            recs.extend(rs)
            for r in rs[:-1]:
                print(f"    {r['file']} with {r['export_options']}: FAILED at {r['stage']}: {r['error'][:300]}")
            r = rs[-1]
            msg = (f"ok {r['size_bytes'] / 1024:.0f} KB, sites {r['attention_sites']}, softmax "
                   f"{r['graph']['softmax_nodes']}, Attention {r['graph']['onnx_attention_nodes']}, "
                   f"err {r['check']['max_abs_error_vs_torch']:.1e}"
                   if r["status"] == "ok" else f"FAILED at {r['stage']}: {r['error'][:300]}")
            print(f"[{i}/{len(jobs)}] {r['file']}: {msg} ({r.get('seconds', '?')} s)", flush=True)
    order = {j[0] + j[1] + j[2]: k for k, j in enumerate(jobs)}
    recs.sort(key=lambda r: order.get(r["architecture"] + r["attn_implementation"] +
                                      {v: k for k, v in EXPORTERS.items()}[(r["exporter"], r["opset"])], 0))
    manifest = {
        "description": "Tiny Hugging Face models (random weights) exported to ONNX for flash-ort's tests. "
                       "attention_sites = layers x attention blocks per layer (self, causal self, cross).",
        "generator": "models/export.py",
        "trace_shape": {"batch": TRACE_BATCH, "sequence": TRACE_SEQ, "decoder_sequence": TRACE_DEC_SEQ},
        "models": [r for r in recs if r["status"] == "ok"],
        "failures": [r for r in recs if r["status"] != "ok"],
    }
    with open(os.path.join(a.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    ok = len(manifest["models"])
    print(f"done: {ok} ok, {len(recs) - ok} failed, {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
