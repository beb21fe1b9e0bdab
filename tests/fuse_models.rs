//! Every exported model in models/ (listed in models/manifest.json): all its attention sites
//! fused, parity with the original in ONNX Runtime (max abs error ≤ 1e-4, fp32), a second fuse
//! changes nothing, and the output passes onnx.checker.

use std::path::PathBuf;
use std::process::Command;

use flash_ort::{fuse, graph, verify};

mod graph_ops;
use graph_ops::{op_count, projection_ops};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// What the manifest says one model holds.
struct Expect {
    file: String,
    sites: usize,
    /// Causal self-attention sites (decoders), with a sliding window or not.
    causal: usize,
    windowed: usize,
    /// Whether K/V have fewer heads than Q (every self-attention site folds its repeat).
    gqa: bool,
}

/// Every model the manifest lists as exported.
fn manifest_models() -> Vec<Expect> {
    let path = repo().join("models/manifest.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        eprintln!("{} missing: no exported models to test", path.display());
        return vec![];
    };
    let json: serde_json::Value = serde_json::from_str(&text).expect("manifest.json parses");
    json["models"]
        .as_array()
        .expect("manifest has a models list")
        .iter()
        .map(|m| {
            let detail = &m["attention_sites_detail"];
            let count = |k: &str| detail[k].as_u64().unwrap_or(0) as usize;
            let cfg = &m["config"];
            Expect {
                file: m["file"].as_str().expect("model file").to_string(),
                sites: m["attention_sites"].as_u64().expect("attention_sites") as usize,
                causal: count("decoder_self_causal") + count("decoder_self_causal_sliding_window"),
                windowed: count("decoder_self_causal_sliding_window"),
                gqa: cfg["num_key_value_heads"].as_u64() < cfg["num_attention_heads"].as_u64(),
            }
        })
        .collect()
}

fn python() -> Option<PathBuf> {
    let p = repo().join(".venv/bin/python");
    p.exists().then_some(p)
}

#[test]
fn every_model_is_fully_fused_with_parity() {
    let models = manifest_models();
    if models.is_empty() {
        return;
    }
    let have_ort = verify::runtime::find_ort_library().is_ok();
    let out_dir = std::env::temp_dir().join(format!("flash-ort-models-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let mut failures = Vec::new();
    let mut written = Vec::new();
    for Expect {
        file,
        sites,
        causal,
        windowed,
        gqa,
    } in &models
    {
        let src = repo().join("models").join(file);
        let mut loaded = graph::load_model(&src).unwrap_or_else(|e| panic!("{file}: {e}"));
        let rep = fuse::fuse_model(&mut loaded.model, true);
        if rep.fused != *sites || rep.skipped != 0 {
            failures.push(format!(
                "{file}: fused {} of {sites} sites, skipped {}:\n{}",
                rep.fused,
                rep.skipped,
                rep.human()
            ));
            continue;
        }
        // Causal triangles and windows proven exactly where the model has them (an encoder made
        // causal would be a wrong rewrite that parity on self-attention might not catch).
        let summaries: Vec<_> = rep
            .sites
            .iter()
            .filter_map(|s| s.summary.as_ref())
            .collect();
        let got_causal = summaries.iter().filter(|s| s.is_causal).count();
        let got_window = summaries
            .iter()
            .filter(|s| s.mask.contains("window_left"))
            .count();
        let got_gqa = summaries.iter().filter(|s| s.gqa_folded).count();
        if got_causal != *causal
            || got_window != *windowed
            || (*gqa && got_gqa != *sites)
            || (!*gqa && got_gqa != 0)
        {
            failures.push(format!(
                "{file}: causal {got_causal}/{causal}, window {got_window}/{windowed}, gqa folded {got_gqa} (gqa model: {gqa})"
            ));
        }
        let once = graph::io::encode_model(&loaded.model);
        let mut again = loaded.model.clone();
        if fuse::fuse_model(&mut again, true).fused != 0 || graph::io::encode_model(&again) != once
        {
            failures.push(format!("{file}: a second fuse changed the model"));
        }
        let out = out_dir.join(file.replace('/', "_"));
        graph::save_model(&loaded.model, &out, &loaded).unwrap();
        written.push(out.clone());
        if have_ort {
            match verify::verify(&src, &out, &verify::Options::default()) {
                Ok(r) if r.ok => {}
                Ok(r) => failures.push(format!("{file}: parity\n{}", r.human())),
                Err(e) => failures.push(format!("{file}: verify failed: {e}")),
            }
        }
    }
    if let Some(py) = python() {
        let script = "import sys, onnx\nbad = []\nfor f in sys.argv[1:]:\n    try:\n        onnx.checker.check_model(f, full_check=True)\n    except Exception as e:\n        bad.append(f + ': ' + str(e)[:300])\nprint('\\n'.join(bad))\nsys.exit(1 if bad else 0)\n";
        let o = Command::new(py)
            .arg("-c")
            .arg(script)
            .args(&written)
            .output()
            .unwrap();
        if !o.status.success() {
            failures.push(format!(
                "onnx.checker: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&out_dir);
    assert!(
        failures.is_empty(),
        "{} of {} models failed:\n{}",
        failures.len(),
        models.len(),
        failures.join("\n")
    );
}

/// A sliding window over right-padded rows leaves some padded queries with no key to see: the
/// operator returns zeros there, the exported graph an average of every value. `verify` must
/// keep those positions out of its verdict, say how many it left out and how far apart they are,
/// and still compare every real position.
#[test]
fn padded_queries_without_keys_are_reported_apart() {
    if verify::runtime::find_ort_library().is_err() {
        eprintln!("ONNX Runtime not found: skipped");
        return;
    }
    let src = repo().join("models/mistral_swa_eager_dyn18.onnx");
    if !src.exists() {
        return;
    }
    let mut loaded = graph::load_model(&src).unwrap();
    assert_eq!(fuse::fuse_model(&mut loaded.model, true).fused, 2);
    let dir = std::env::temp_dir().join(format!("flash-ort-padded-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("mistral_fused.onnx");
    graph::save_model(&loaded.model, &out, &loaded).unwrap();
    // Row r keeps 12 − r tokens: row 7 keeps 5, so its queries 9..11 (window 4) see only padding.
    let opts = verify::Options {
        dims: verify::Dims {
            batch: 8,
            seq: 12,
            past: 3,
        },
        ..Default::default()
    };
    let rep = verify::verify(&src, &out, &opts).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    assert!(rep.ok, "{}", rep.human());
    let o = &rep.outputs[0];
    let padded: usize = (0..8).map(|r: usize| r.min(11)).sum();
    assert_eq!(o.padded_excluded, padded, "{}", rep.human());
    assert!(o.padded_max_abs > o.tolerance, "{}", rep.human());
    assert!(rep.human().contains("padded positions excluded"));
}

/// Models whose heads are split by `Reshape → Transpose` and merged by `Transpose → Reshape`
/// end with fused nodes on the `[B, S, H·D]` projections and none of those transposes left
/// (fuse::layout); `every_model_is_fully_fused_with_parity` checks their outputs.
#[test]
fn head_split_and_merge_transposes_fold_into_the_3d_layout() {
    for file in [
        "bert_eager_ts17.onnx",
        "bert_sdpa_dyn18.onnx",
        "distilbert_eager_ts17.onnx",
        "bart_eager_dyn18.onnx",
        // The merge's target from Shape of the merged heads; Q/K/V from an equal 3-way Split.
        "gpt2_eager_ts17.onnx",
        // Merged to [B·S, H·Dv]: that Reshape stays, reading the 3D output.
        "gpt2_sdpa_dyn18.onnx",
    ] {
        let src = repo().join("models").join(file);
        let mut loaded = graph::load_model(&src).unwrap_or_else(|e| panic!("{file}: {e}"));
        let rep = fuse::fuse_model(&mut loaded.model, true);
        let g = loaded.model.graph.as_ref().unwrap();
        let op = |n: &graph::onnx::NodeProto, t: &str| n.op_type.as_deref() == Some(t);
        let flash: Vec<_> = g.node.iter().filter(|n| op(n, "FlashAttention")).collect();
        assert!(!flash.is_empty() && flash.len() == rep.fused, "{file}");
        for n in &flash {
            let heads = |name: &str| {
                n.attribute
                    .iter()
                    .find(|a| a.name.as_deref() == Some(name))
                    .and_then(|a| a.i)
            };
            assert!(
                heads("q_num_heads").is_some() && heads("kv_num_heads").is_some(),
                "{file}: {:?} still takes 4D inputs",
                n.name
            );
        }
        assert!(
            !g.node.iter().any(|n| op(n, "Transpose")),
            "{file}: a head transpose is left"
        );
        for s in &rep.sites {
            let layout = &s.summary.as_ref().expect("fused site").layout;
            assert!(
                layout.starts_with("BSD"),
                "{file}: {} reports {layout}",
                s.anchor
            );
        }
    }
}

/// `models/bert_eager_ts17.onnx` with `tensor` also exposed as a graph output.
fn bert_with_output(tensor: &str) -> graph::LoadedModel {
    let mut loaded = graph::load_model(&repo().join("models/bert_eager_ts17.onnx")).unwrap();
    let g = loaded.model.graph.as_mut().unwrap();
    assert!(g.node.iter().any(|n| n.output.iter().any(|o| o == tensor)));
    g.output.push(graph::onnx::ValueInfoProto {
        name: Some(tensor.into()),
        ..Default::default()
    });
    loaded
}

/// Fuses BERT with `tensor` exposed: the report, and whether each fused node reads 3D inputs.
/// Checks that `tensor` is still produced and that every output, `tensor` included, matches.
fn fuse_bert_with_output(tensor: &str) -> (fuse::Report, Vec<bool>) {
    let mut loaded = bert_with_output(tensor);
    let rep = fuse::fuse_model(&mut loaded.model, true);
    assert_eq!(rep.fused, 2, "{}", rep.human());
    let g = loaded.model.graph.as_ref().unwrap();
    let three_d = g
        .node
        .iter()
        .filter(|n| n.op_type.as_deref() == Some("FlashAttention"))
        .map(|n| {
            n.attribute
                .iter()
                .any(|a| a.name.as_deref() == Some("q_num_heads"))
        })
        .collect();
    assert!(
        g.node.iter().any(|n| n.output.iter().any(|o| o == tensor)),
        "{tensor} still produced"
    );
    if verify::runtime::find_ort_library().is_ok() {
        let dir = std::env::temp_dir().join(format!("flash-ort-layout-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (orig, out) = (dir.join("orig.onnx"), dir.join("fused.onnx"));
        let original = bert_with_output(tensor);
        graph::save_model(&original.model, &orig, &original).unwrap();
        graph::save_model(&loaded.model, &out, &loaded).unwrap();
        let r = verify::verify(&orig, &out, &verify::Options::default()).unwrap();
        std::fs::remove_dir_all(&dir).ok();
        assert!(r.ok, "{}", r.human());
        assert_eq!(r.outputs.len(), 2);
    }
    (rep, three_d)
}

/// A head split that something else also reads (here: a graph output) stays for that reader;
/// the fused node still reads the projection, so both layers take the 3D layout.
#[test]
fn a_head_split_read_elsewhere_stays_for_its_reader() {
    let (rep, three_d) =
        fuse_bert_with_output("/model/encoder/layer.0/attention/self/Transpose_output_0");
    assert_eq!(three_d, [true, true]);
    let note = rep.sites[0].summary.as_ref().unwrap().layout_note.clone();
    assert!(
        note.as_deref()
            .is_some_and(|n| n.contains("kept for their other readers")
                && n.contains("layer.0/attention/self/Transpose")),
        "{note:?}"
    );
    assert!(rep.sites[1].summary.as_ref().unwrap().layout_note.is_none());
}

/// Merged heads that something else reads cannot go (the fused node would no longer produce
/// them): that layer keeps the 4D layout with the reason in the report, the other one folds.
#[test]
fn merged_heads_read_elsewhere_keep_the_4d_layout() {
    let (rep, three_d) =
        fuse_bert_with_output("/model/encoder/layer.0/attention/self/Transpose_3_output_0");
    assert_eq!(three_d, [false, true]);
    let first = rep.sites[0].summary.as_ref().unwrap();
    assert_eq!(first.layout, "BHSD");
    let note = first.layout_note.as_deref().unwrap_or_default();
    assert!(note.starts_with("Y is not merged back"), "{note}");
    assert!(rep.sites[1]
        .summary
        .as_ref()
        .unwrap()
        .layout
        .starts_with("BSD"));
}

/// Fuses `file` with and without Q/K/V packing: (report and model packed, model unpacked).
fn fuse_both_ways(file: &str) -> (fuse::Report, graph::LoadedModel, graph::onnx::ModelProto) {
    let src = repo().join("models").join(file);
    let mut packed = graph::load_model(&src).unwrap_or_else(|e| panic!("{file}: {e}"));
    // Packing alone: the bias fold would leave Q alone with a bias.
    let on = fuse::Options {
        fold_bias: false,
        ..Default::default()
    };
    let rep = fuse::fuse_model_with(&mut packed.model, &on);
    let mut plain = graph::load_model(&src).unwrap().model;
    let off = fuse::Options {
        pack_qkv: false,
        ..on
    };
    let rep_off = fuse::fuse_model_with(&mut plain, &off);
    assert_eq!(rep_off.qkv_packed, 0, "{file}");
    assert!(
        rep_off
            .sites
            .iter()
            .all(|s| s.summary.as_ref().unwrap().qkv_pack.is_none()),
        "{file}: no qkv_pack note when packing is off"
    );
    (rep, packed, plain)
}

/// Each fused site's Q, K and V projections become one MatMul (+ one bias Add) + Split: two
/// MatMuls (and two Adds where they have biases) fewer per layer than the fused model without
/// packing, the weights not duplicated, and ORT on the CPU gives the original's outputs. BERT
/// (biases, zero biases shared through Identity by the TorchScript export), LLaMA (GQA widths,
/// rotary embedding between the projections and the 4D fused node), T5 (no biases; cross
/// attention projects two inputs and stays), ONNX `Attention` (dynamo opset 23).
#[test]
fn qkv_projections_pack_into_one_matmul() {
    let have_ort = verify::runtime::find_ort_library().is_ok();
    let dir = std::env::temp_dir().join(format!("flash-ort-pack-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // (file, packed sites, sites with bias Adds packed, unpacked reasons)
    let cases: [(&str, usize, usize, &[&str]); 8] = [
        ("bert_eager_ts17.onnx", 2, 2, &[]),
        ("bert_sdpa_dyn18.onnx", 2, 2, &[]),
        ("bert_sdpa_dyn23.onnx", 2, 2, &[]),
        ("llama_gqa_eager_ts17.onnx", 2, 0, &[]),
        ("llama_gqa_sdpa_dyn18.onnx", 2, 0, &[]),
        ("t5_sdpa_dyn18.onnx", 4, 0, &["qkv-inputs-differ"; 2]),
        // GPT-2's c_attn is packed already; the optimize=False dynamo export transposes the
        // weights in the graph.
        ("gpt2_eager_ts17.onnx", 0, 0, &["qkv-already-packed"; 2]),
        (
            "llama_gqa_sdpa_dyn23.onnx",
            0,
            0,
            &["qkv-weight-not-constant"; 2],
        ),
    ];
    for (file, packed_sites, biased, reasons) in cases {
        let (rep, packed, plain) = fuse_both_ways(file);
        assert_eq!(rep.qkv_packed, packed_sites, "{file}: {}", rep.human());
        let why: Vec<&str> = rep
            .sites
            .iter()
            .filter_map(|s| s.summary.as_ref()?.qkv_pack.as_ref())
            .filter(|p| !p.packed)
            .filter_map(|p| p.reason)
            .collect();
        assert_eq!(why, reasons, "{file}");
        let (mm, add, split) = projection_ops(&packed.model);
        let (mm0, add0, split0) = projection_ops(&plain);
        assert_eq!(
            (mm, add, split),
            (
                mm0 - 2 * packed_sites,
                add0 - 2 * biased,
                split0 + packed_sites
            ),
            "{file}: (MatMul, Add, Split) packed vs not"
        );
        let bytes = |m: &graph::onnx::ModelProto| graph::io::encode_model(m).len() as f64;
        assert!(
            bytes(&packed.model) < 1.05 * bytes(&plain),
            "{file}: the old weights stay"
        );
        if have_ort && packed_sites > 0 {
            let out = dir.join(file);
            graph::save_model(&packed.model, &out, &packed).unwrap();
            let src = repo().join("models").join(file);
            let r = verify::verify(&src, &out, &verify::Options::default()).unwrap();
            assert!(r.ok, "{file}: {}", r.human());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The K/V bias fold (fuse::bias_fold) on real exports: where a fused node takes the 3D layout
/// and its K/V come from biased projections, two bias Adds per site go (and V's bias moves into
/// the output projection's), and ORT on the CPU gives the original's outputs; elsewhere nothing
/// changes.
#[test]
fn kv_bias_adds_fold_away() {
    let have_ort = verify::runtime::find_ort_library().is_ok();
    let dir = std::env::temp_dir().join(format!("flash-ort-fold-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let files = [
        "bert_eager_ts17.onnx",
        "bert_sdpa_dyn18.onnx",
        "bert_sdpa_dyn23.onnx",
        "llama_gqa_sdpa_dyn18.onnx",
        "gpt2_eager_ts17.onnx",
        "t5_sdpa_dyn18.onnx",
    ];
    let mut folded_any = 0;
    for file in files {
        let src = repo().join("models").join(file);
        let mut folded = graph::load_model(&src).unwrap();
        let fold_only = fuse::Options {
            pack_qkv: false,
            ..Default::default()
        };
        let rep = fuse::fuse_model_with(&mut folded.model, &fold_only);
        let mut kept = graph::load_model(&src).unwrap().model;
        let neither = fuse::Options {
            fold_bias: false,
            ..fold_only
        };
        fuse::fuse_model_with(&mut kept, &neither);
        let notes: Vec<&str> = rep
            .sites
            .iter()
            .filter_map(|s| s.summary.as_ref()?.bias_fold.as_deref())
            .collect();
        assert_eq!(notes.len(), rep.bias_folded, "{file}");
        let v_folds = notes.iter().filter(|n| n.contains("V bias")).count();
        let k_drops = notes.iter().filter(|n| n.contains("K bias")).count();
        let (mm, add, _) = projection_ops(&folded.model);
        let (mm0, add0, _) = projection_ops(&kept);
        assert_eq!(mm, mm0, "{file}");
        assert_eq!(add0 - add, v_folds + k_drops, "{file}: {notes:?}");
        folded_any += rep.bias_folded;
        if have_ort && rep.bias_folded > 0 {
            let out = dir.join(file);
            graph::save_model(&folded.model, &out, &folded).unwrap();
            let r = verify::verify(&src, &out, &verify::Options::default()).unwrap();
            assert!(r.ok, "{file}: {}", r.human());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(folded_any > 0, "no model folded anything");
}

/// TorchScript exports of Hugging Face models spell the key padding mask as an index gather
/// (`attention_mask[batch_idx, kv_idx]`: Shape, Range, Unsqueeze, Mul, Add, Flatten, Gather,
/// Reshape). Once fused, each node's mask reads `Unsqueeze(mask)` instead and the gather chain is
/// gone; parity with padded rows of different lengths (in `every_model_is_fully_fused_with_parity`
/// and here) shows it is the same mask. Exports that do not gather (dynamo) keep their mask.
#[test]
fn gathered_padding_masks_read_the_mask_directly() {
    let have_ort = verify::runtime::find_ort_library().is_ok();
    let dir = std::env::temp_dir().join(format!("flash-ort-padmask-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // (file, sites whose mask is read directly): encoder, causal decoders (padding and'ed with
    // the triangle), GQA, encoder-decoder with cross attention.
    // One Unsqueeze per distinct gathered mask, shared by the sites reading it (BART: the
    // encoder's self and cross attention masks, the decoder's).
    let cases = [
        ("bert_eager_ts17.onnx", 2, 1),
        // Position ids from a CumSum over input_ids and token types through GatherElements:
        // shapes followed through both, or the batch would not be proven.
        ("roberta_eager_ts17.onnx", 2, 1),
        ("gpt2_eager_ts17.onnx", 2, 1),
        ("llama_gqa_sdpa_ts17.onnx", 2, 1),
        ("bart_eager_ts17.onnx", 6, 3),
        ("bert_sdpa_dyn18.onnx", 0, 0),
    ];
    for (file, want, masks) in cases {
        let src = repo().join("models").join(file);
        let mut loaded = graph::load_model(&src).unwrap();
        let before = graph::load_model(&src).unwrap().model;
        let rep = fuse::fuse_model(&mut loaded.model, true);
        let noted = rep
            .sites
            .iter()
            .filter(|s| {
                s.summary
                    .as_ref()
                    .is_some_and(|x| x.mask.contains("index gather dropped"))
            })
            .count();
        assert_eq!(noted, want, "{file}: {}", rep.human());
        let g = loaded.model.graph.as_ref().unwrap();
        if want == 0 {
            continue;
        }
        assert!(
            op_count(&before, "Flatten") > 0,
            "{file}: no gather to drop"
        );
        assert_eq!(
            op_count(&loaded.model, "Flatten"),
            0,
            "{file}: the gather is left"
        );
        // The Unsqueeze reads the graph input attention_mask (cast to bool, maybe reshaped).
        let producer = |t: &str| g.node.iter().find(|n| n.output.iter().any(|o| o == t));
        let unsq: Vec<_> = g
            .node
            .iter()
            .filter(|n| {
                n.name
                    .as_deref()
                    .is_some_and(|s| s.contains("unsqueeze_node"))
            })
            .collect();
        assert_eq!(unsq.len(), masks, "{file}: Unsqueezes of padding masks");
        for u in unsq {
            let mut t = u.input[0].clone();
            for _ in 0..4 {
                match producer(&t) {
                    Some(p) if matches!(p.op_type.as_deref(), Some("Cast" | "Reshape")) => {
                        t = p.input[0].clone()
                    }
                    _ => break,
                }
            }
            // A graph input mask, or the all-ones mask BART's decoder builds when it has none.
            let input_mask = g
                .input
                .iter()
                .any(|i| i.name.as_deref() == Some(t.as_str()))
                && t.contains("mask");
            let ones =
                producer(&t).is_some_and(|p| p.op_type.as_deref() == Some("ConstantOfShape"));
            assert!(
                input_mask || ones,
                "{file}: the Unsqueeze reads {t}, not a graph input mask"
            );
        }
        if have_ort {
            let out = dir.join(file);
            graph::save_model(&loaded.model, &out, &loaded).unwrap();
            let r = verify::verify(&src, &out, &verify::Options::default()).unwrap();
            assert!(r.ok, "{file}: {}", r.human());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same gather with a stride of 0 instead of S (`attention_mask.flatten()[0·b + j]`: every
/// batch row reads row 0's mask) is not a padding mask of each row: it must stay as it is, and
/// the fused model must still match the original with rows padded differently.
#[test]
fn a_gather_that_is_not_the_rows_mask_stays() {
    let src = repo().join("models/bert_eager_ts17.onnx");
    let mut loaded = graph::load_model(&src).unwrap();
    let g = loaded.model.graph.as_mut().unwrap();
    let mul = g
        .node
        .iter_mut()
        .find(|n| n.name.as_deref() == Some("/model/Mul"))
        .expect("the b·S product of the mask gather");
    assert_eq!(mul.input[1], "/model/Gather_3_output_0", "export changed");
    mul.input[1] = "zero_stride".into();
    g.initializer
        .push(graph::tensor::int64_tensor("zero_stride", &[1], &[0]));
    let dir = std::env::temp_dir().join(format!("flash-ort-padneg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let changed = dir.join("changed.onnx");
    graph::save_model(&loaded.model, &changed, &loaded).unwrap();
    let rep = fuse::fuse_model(&mut loaded.model, true);
    assert_eq!(rep.fused, 2, "{}", rep.human());
    assert!(
        rep.sites.iter().all(|s| s
            .summary
            .as_ref()
            .is_some_and(|x| !x.mask.contains("index gather dropped"))),
        "{}",
        rep.human()
    );
    assert_eq!(
        op_count(&loaded.model, "Flatten"),
        1,
        "the gather must stay"
    );
    if verify::runtime::find_ort_library().is_ok() {
        let out = dir.join("fused.onnx");
        graph::save_model(&loaded.model, &out, &loaded).unwrap();
        let r = verify::verify(&changed, &out, &verify::Options::default()).unwrap();
        assert!(r.ok, "{}", r.human());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
