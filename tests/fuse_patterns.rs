//! One tiny hand-built graph per pattern variant (tests/graphs/fuse_*.onnx, made by
//! tests/graphs/build.py): fused count, the fused node's attributes, idempotence and parity in
//! ONNX Runtime with the operator library; and one graph per skip reason
//! (tests/graphs/skip_<code>.onnx) that must stay byte-for-byte as it was.

use std::path::PathBuf;

use flash_ort::fuse::{self, Report};
use flash_ort::graph::{self, io, onnx::ModelProto, onnx::NodeProto};

mod graph_ops;
use graph_ops::{op_count, projection_ops};

fn graph_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/graphs")
        .join(name)
}

fn fused(name: &str) -> (ModelProto, Report) {
    let mut m = graph::load_model(&graph_path(name)).expect("load").model;
    let rep = fuse::fuse_model(&mut m, true);
    (m, rep)
}

fn flash_nodes(m: &ModelProto) -> Vec<&NodeProto> {
    m.graph
        .as_ref()
        .unwrap()
        .node
        .iter()
        .filter(|n| n.domain.as_deref() == Some("com.flash"))
        .collect()
}

fn attr_f(n: &NodeProto, a: &str) -> Option<f32> {
    n.attribute
        .iter()
        .find(|x| x.name.as_deref() == Some(a))
        .and_then(|x| x.f)
}
fn attr_i(n: &NodeProto, a: &str) -> Option<i64> {
    n.attribute
        .iter()
        .find(|x| x.name.as_deref() == Some(a))
        .and_then(|x| x.i)
}

/// ORT parity of the fused graph against the original, when ONNX Runtime can be found.
fn parity(name: &str, m: &ModelProto) {
    if flash_ort::verify::runtime::find_ort_library().is_err() {
        eprintln!("ONNX Runtime not found (ORT_DYLIB_PATH / .venv): parity of {name} not run");
        return;
    }
    let dir = std::env::temp_dir().join(format!("flash-ort-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(name);
    std::fs::write(&out, io::encode_model(m)).unwrap();
    let rep = flash_ort::verify::verify(&graph_path(name), &out, &Default::default())
        .expect("verify runs");
    for o in &rep.outputs {
        assert!(
            o.ok,
            "{name}: output {} max abs {} > {}",
            o.name, o.max_abs, o.tolerance
        );
    }
    assert!(rep.ok);
}

/// Fuses `name`, checks one fused site, idempotence and parity; returns the fused node.
fn check_variant(name: &str) -> NodeProto {
    let (m, rep) = fused(name);
    assert_eq!((rep.fused, rep.skipped), (1, 0), "{name}: {}", rep.human());
    let nodes = flash_nodes(&m);
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].op_type.as_deref(), Some("FlashAttention"));
    assert!(m
        .opset_import
        .iter()
        .any(|o| o.domain.as_deref() == Some("com.flash") && o.version == Some(1)));
    // No Softmax left behind.
    assert!(!m
        .graph
        .as_ref()
        .unwrap()
        .node
        .iter()
        .any(|n| n.op_type.as_deref() == Some("Softmax")));
    // Running fuse again changes nothing.
    let once = io::encode_model(&m);
    let mut again = m.clone();
    let rep2 = fuse::fuse_model(&mut again, true);
    assert_eq!(rep2.fused, 0);
    assert_eq!(
        io::encode_model(&again),
        once,
        "{name}: second fuse changed the model"
    );
    parity(name, &m);
    nodes[0].clone()
}

const INV_SQRT8: f32 = 0.353_553_38;

#[test]
fn bert_eager_div_scale_padding_mask_dropout() {
    let n = check_variant("fuse_bert_eager.onnx");
    assert!((attr_f(&n, "scale").unwrap() - INV_SQRT8).abs() < 1e-6);
    assert_eq!(attr_i(&n, "is_causal"), None);
    assert_eq!(
        n.input.len(),
        4,
        "additive padding mask passed as attn_mask"
    );
    // K arrives BSHD→BHDS; the rewrite reads it through a new [0,2,1,3] transpose.
}

#[test]
fn sdpa_sqrt_scale_from_shape_and_nan_guard() {
    let n = check_variant("fuse_sdpa_sqrt_scale.onnx");
    assert!((attr_f(&n, "scale").unwrap() - INV_SQRT8).abs() < 1e-6);
    assert_eq!(n.input.len(), 4);
}

#[test]
fn dynamo_reshape_transpose_reshape_k() {
    let n = check_variant("fuse_dynamo_k_reshape.onnx");
    assert!((attr_f(&n, "scale").unwrap() - INV_SQRT8).abs() < 1e-6);
    assert_eq!(n.input.len(), 3);
}

#[test]
fn gqa_repeat_kv_is_folded() {
    let (m, rep) = fused("fuse_gqa_repeat_kv.onnx");
    assert!(rep.sites[0].summary.as_ref().unwrap().gqa_folded);
    // No Expand of K/V survives.
    assert!(!m
        .graph
        .as_ref()
        .unwrap()
        .node
        .iter()
        .any(|n| n.op_type.as_deref() == Some("Expand")));
    check_variant("fuse_gqa_repeat_kv.onnx");
}

#[test]
fn softcap_is_recognized() {
    let n = check_variant("fuse_softcap.onnx");
    assert_eq!(attr_f(&n, "softcap"), Some(30.0));
    assert_eq!(attr_f(&n, "scale"), Some(0.25));
}

#[test]
fn gpt2_constant_causal_buffer_becomes_is_causal() {
    let n = check_variant("fuse_gpt2_causal_buffer.onnx");
    assert_eq!(attr_i(&n, "is_causal"), Some(1));
    assert_eq!(
        n.input.len(),
        3,
        "no attn_mask left once the triangle is proven"
    );
}

#[test]
fn t5_no_scale_position_bias() {
    let n = check_variant("fuse_t5_position_bias.onnx");
    assert_eq!(attr_f(&n, "scale"), Some(1.0));
    assert_eq!(n.input.len(), 4);
}

#[test]
fn cross_attention_different_lengths() {
    let n = check_variant("fuse_cross_attention.onnx");
    assert_eq!(attr_i(&n, "is_causal"), None);
}

#[test]
fn fp16_softmax_between_casts() {
    let n = check_variant("fuse_fp16_cast_softmax.onnx");
    assert!((attr_f(&n, "scale").unwrap() - INV_SQRT8).abs() < 1e-3);
}

#[test]
fn onnx_attention_renamed() {
    let n = check_variant("fuse_onnx_attention.onnx");
    assert_eq!(attr_f(&n, "scale"), Some(0.3));
    let n = check_variant("fuse_onnx_attention_causal.onnx");
    assert_eq!(attr_i(&n, "is_causal"), Some(1));
}

#[test]
fn every_skip_reason_leaves_the_graph_alone() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/graphs");
    let mut seen = 0;
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    for p in files {
        let stem = p.file_stem().unwrap().to_str().unwrap().to_string();
        let Some(code) = stem.strip_prefix("skip_") else {
            continue;
        };
        let loaded = graph::load_model(&p).unwrap();
        let before = io::encode_model(&loaded.model);
        let mut m = loaded.model;
        let rep = fuse::fuse_model(&mut m, true);
        assert_eq!(rep.fused, 0, "{stem}: {}", rep.human());
        assert_eq!(rep.sites.len(), 1, "{stem}");
        let reason = rep.sites[0].reason.as_ref().expect("a reason");
        assert_eq!(reason.code, code, "{stem}: {reason}");
        assert!(!reason.node.is_empty());
        assert!(
            fuse::reason::CODES.iter().any(|(c, _)| *c == code),
            "{code} is documented"
        );
        assert_eq!(io::encode_model(&m), before, "{stem}: the model changed");
        seen += 1;
    }
    assert!(seen >= 15, "only {seen} negative graphs");
}

#[test]
fn batched_3d_runs_as_one_batch_of_bh_heads() {
    let n = check_variant("fuse_batched_3d.onnx");
    assert!((attr_f(&n, "scale").unwrap() - INV_SQRT8).abs() < 1e-6);
    assert_eq!(
        n.input.len(),
        4,
        "the [B·H, S, S] mask is passed, unsqueezed"
    );
    let (m, _) = fused("fuse_batched_3d.onnx");
    let ops: Vec<_> = m
        .graph
        .as_ref()
        .unwrap()
        .node
        .iter()
        .filter_map(|n| n.op_type.as_deref())
        .collect();
    assert_eq!(ops.iter().filter(|o| **o == "Unsqueeze").count(), 4);
    assert_eq!(ops.iter().filter(|o| **o == "Squeeze").count(), 1);
}

#[test]
fn subgraphs_are_searched() {
    let (m, rep) = fused("fuse_subgraph_if.onnx");
    assert_eq!((rep.fused, rep.skipped), (2, 0), "{}", rep.human());
    assert!(rep.sites.iter().all(|s| s.graph.starts_with("main/if.")));
    let iff = &m.graph.as_ref().unwrap().node[0];
    for a in &iff.attribute {
        let g = a.g.as_ref().unwrap();
        assert!(g
            .node
            .iter()
            .any(|n| n.domain.as_deref() == Some("com.flash")));
        assert!(!g
            .node
            .iter()
            .any(|n| n.op_type.as_deref() == Some("Softmax")));
    }
    assert!(m
        .opset_import
        .iter()
        .any(|o| o.domain.as_deref() == Some("com.flash")));
    let mut again = m.clone();
    assert_eq!(fuse::fuse_model(&mut again, true).fused, 0);
    assert_eq!(io::encode_model(&again), io::encode_model(&m));
    parity("fuse_subgraph_if.onnx", &m);
}

#[test]
fn hf_range_mask_gives_causal_and_window() {
    let n = check_variant("fuse_hf_causal_window.onnx");
    assert_eq!(attr_i(&n, "is_causal"), Some(1));
    assert_eq!(
        attr_i(&n, "window_left"),
        Some(2),
        "kv > q − 3 keeps keys i−2..i"
    );
    assert_eq!(n.input.len(), 4, "the padding part stays as attn_mask");
}

#[test]
fn trilu_of_ones_is_causal() {
    let n = check_variant("fuse_trilu_causal.onnx");
    assert_eq!(attr_i(&n, "is_causal"), Some(1));
    assert_eq!(n.input.len(), 3);
}

#[test]
fn a_shifted_triangle_is_not_taken_for_causal() {
    // Fused, but the mask is passed as it is: having a triangle-looking mask is not causality.
    let n = check_variant("fuse_shifted_triangle_not_causal.onnx");
    assert_eq!(attr_i(&n, "is_causal"), None);
    assert_eq!(attr_i(&n, "window_left"), None);
    assert_eq!(n.input.len(), 4);
}

#[test]
fn onnx_checker_accepts_every_fused_graph() {
    let py = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    if !py.exists() {
        eprintln!(".venv missing: onnx.checker not run");
        return;
    }
    let dir = std::env::temp_dir().join(format!("flash-ort-checker-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = Vec::new();
    for e in std::fs::read_dir(graph_path("")).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("fuse_") && name.ends_with(".onnx") {
            let (m, _) = fused(&name);
            let out = dir.join(&name);
            std::fs::write(&out, io::encode_model(&m)).unwrap();
            files.push(out);
        }
    }
    let script = "import sys, onnx\nfor f in sys.argv[1:]:\n    onnx.checker.check_model(onnx.load(f), full_check=True)\n";
    let o = std::process::Command::new(py)
        .arg("-c")
        .arg(script)
        .args(&files)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(files.len() >= 15);
}

#[test]
fn softcap_after_a_score_scale() {
    let n = check_variant("fuse_softcap_score_scale.onnx");
    assert_eq!(attr_f(&n, "softcap"), Some(30.0));
    assert_eq!(attr_f(&n, "scale"), Some(0.25));
}

#[test]
fn kv_cache_step_keeps_present_outputs() {
    let n = check_variant("fuse_kv_cache.onnx");
    assert_eq!(
        attr_i(&n, "is_causal"),
        None,
        "Sq ≠ Skv: never causal from a mask"
    );
    assert_eq!(n.input[1], "present_key", "K is the concatenated cache");
    let (m, _) = fused("fuse_kv_cache.onnx");
    let g = m.graph.as_ref().unwrap();
    assert!(g
        .node
        .iter()
        .any(|n| n.output.first().map(String::as_str) == Some("present_key")));
}

/// The names of the nodes that produce `t`, walking up to `depth` producers.
fn producers_of(m: &ModelProto, t: &str, depth: usize) -> Vec<String> {
    let g = m.graph.as_ref().unwrap();
    let mut out = Vec::new();
    let mut frontier = vec![t.to_string()];
    for _ in 0..depth {
        let mut next = Vec::new();
        for n in g
            .node
            .iter()
            .filter(|n| n.output.iter().any(|o| frontier.contains(o)))
        {
            out.push(n.op_type.clone().unwrap_or_default());
            next.extend(n.input.iter().cloned());
        }
        frontier = next;
    }
    out
}

#[test]
fn hf_bidirectional_mask_goes_in_as_the_padding_vector() {
    for name in [
        "fuse_hf_bidirectional_mask.onnx",
        "fuse_hf_bidirectional_bool.onnx",
    ] {
        let n = check_variant(name);
        assert_eq!(n.input.len(), 4, "{name}");
        // Built from the [B, 1, 1, S] padding vector: no And with the all-true rows and no
        // Expand to [B, 1, S, S] on its way in, and those nodes are gone from the graph.
        let (m, _) = fused(name);
        let ops = producers_of(&m, &n.input[3], 8);
        assert!(
            !ops.iter()
                .any(|o| o == "Expand" || o == "And" || o == "GreaterOrEqual"),
            "{name}: mask built by {ops:?}"
        );
        let left: Vec<_> = m
            .graph
            .as_ref()
            .unwrap()
            .node
            .iter()
            .filter_map(|n| n.op_type.as_deref())
            .filter(|o| matches!(*o, "Expand" | "And" | "GreaterOrEqual"))
            .collect();
        assert!(left.is_empty(), "{name}: dead mask nodes left: {left:?}");
    }
}

#[test]
fn omitted_optional_inputs_before_a_present_one_are_filled() {
    for (name, len) in [
        ("fuse_onnx_attention_past_no_mask.onnx", 6),
        ("fuse_onnx_attention_nonpad.onnx", 7),
        ("fuse_onnx_attention_nonpad_3d.onnx", 7),
    ] {
        let n = check_variant(name);
        assert_eq!(n.input.len(), len, "{name}");
        assert!(
            n.input.iter().all(|i| !i.is_empty()),
            "{name}: a gap in {:?}",
            n.input
        );
    }
}

/// BERT as ONNX Runtime's transformer optimizer leaves it with attention fusion off: layers
/// joined by SkipLayerNormalization/BiasGelu (com.microsoft), one shape computation shared by
/// every layer's head split and merge. Every layer takes the 3D layout (not only the first,
/// whose input is a standard LayerNormalization), no head transpose or head Reshape is left,
/// the shared shape computation stays for the Reshape outside attention, and ORT gives the
/// same outputs.
#[test]
fn ort_optimized_bert_folds_every_layer() {
    let name = "fuse_ort_optimized_bert.onnx";
    let (m, rep) = fused(name);
    assert_eq!((rep.fused, rep.skipped), (3, 0), "{}", rep.human());
    for s in &rep.sites {
        let sum = s.summary.as_ref().unwrap();
        assert!(
            sum.layout.starts_with("BSD"),
            "{}: {}",
            s.anchor,
            sum.layout
        );
        assert_eq!(sum.layout_note, None, "{}", s.anchor);
    }
    for n in flash_nodes(&m) {
        assert_eq!(attr_i(n, "q_num_heads"), Some(4));
        assert_eq!(attr_i(n, "kv_num_heads"), Some(4));
    }
    let count = |op: &str| op_count(&m, op);
    assert_eq!(count("Transpose"), 0);
    // Left: the output Reshape and the merge shape it shares with the (gone) head merges.
    assert_eq!((count("Reshape"), count("Concat")), (1, 1));
    assert_eq!(count("SkipLayerNormalization"), 6);
    let once = io::encode_model(&m);
    let mut again = m.clone();
    assert_eq!(fuse::fuse_model(&mut again, true).fused, 0);
    assert_eq!(io::encode_model(&again), once, "second fuse changed it");
    parity(name, &m);
}

/// ORT-optimized BERT (attention fusion off): each layer's Q, K and V projections (MatMul +
/// bias Add, bias first) become one MatMul against the [32, 96] weight, one Add and a Split
/// feeding the 3D fused node; ORT gives the same outputs. Without packing the three stay.
#[test]
fn ort_optimized_bert_packs_qkv_into_one_matmul_per_layer() {
    let name = "fuse_ort_optimized_bert.onnx";
    let original = graph::load_model(&graph_path(name)).unwrap().model;
    let mut plain = original.clone();
    // Packing alone (the default bias fold would leave Q alone with a bias: no packing).
    let on = fuse::Options {
        fold_bias: false,
        ..Default::default()
    };
    let off = fuse::Options {
        pack_qkv: false,
        ..on
    };
    assert_eq!(fuse::fuse_model_with(&mut plain, &off).qkv_packed, 0);
    let mut m = original.clone();
    let rep = fuse::fuse_model_with(&mut m, &on);
    assert_eq!(rep.qkv_packed, 3, "{}", rep.human());
    // By default the K and V bias Adds fold away instead (V's into SkipLayerNormalization's
    // bias) and the projections stay three.
    let (folded, rep_folded) = fused(name);
    assert_eq!((rep_folded.bias_folded, rep_folded.qkv_packed), (3, 0));
    assert_eq!(projection_ops(&folded), (18, 3, 0));
    // 3 layers: Q/K/V + O + 2 MLP MatMuls each; plus the 2 score matmuls that fusing removed.
    assert_eq!(projection_ops(&original), (24, 12, 0));
    assert_eq!(projection_ops(&plain), (18, 9, 0));
    assert_eq!(projection_ops(&m), (12, 3, 3));
    let g = m.graph.as_ref().unwrap();
    let packed: Vec<_> = g
        .initializer
        .iter()
        .filter(|t| {
            t.name
                .as_deref()
                .is_some_and(|n| n.ends_with("_qkv_weight"))
        })
        .collect();
    assert_eq!(packed.len(), 3);
    assert!(packed.iter().all(|t| t.dims == [32, 96]));
    // Every fused node reads the three Split outputs in order.
    for n in flash_nodes(&m) {
        let split = g
            .node
            .iter()
            .find(|s| s.output.first() == n.input.first())
            .unwrap();
        assert_eq!(split.op_type.as_deref(), Some("Split"));
        assert_eq!(split.output[..], n.input[..3]);
    }
    assert!(rep.human().contains("qkv packed"));
    parity(name, &m);
}
