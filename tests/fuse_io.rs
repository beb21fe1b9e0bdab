//! Model I/O: malformed and truncated files give errors (never panics, property-tested), external
//! data is validated but never loaded, and paths that leave the model's folder are refused.

use std::path::{Path, PathBuf};

use flash_ort::fuse;
use flash_ort::graph::onnx::{tensor_proto::DataLocation, ModelProto, StringStringEntryProto};
use flash_ort::graph::{self, io};
use proptest::prelude::*;

fn graph_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/graphs")
        .join(name)
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flash-ort-io-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn valid_bytes() -> Vec<u8> {
    std::fs::read(graph_path("fuse_gqa_repeat_kv.onnx")).unwrap()
}

/// Seeds for mutation: tiny graphs of several patterns, and real exports when models/ has them.
fn seeds() -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = [
        "fuse_gqa_repeat_kv.onnx",
        "fuse_hf_causal_window.onnx",
        "fuse_batched_3d.onnx",
        "fuse_subgraph_if.onnx",
        "fuse_onnx_attention.onnx",
    ]
    .iter()
    .map(|n| std::fs::read(graph_path(n)).unwrap())
    .collect();
    let models = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models");
    for n in [
        "llama_gqa_sdpa_dyn18.onnx",
        "gpt2_eager_ts17.onnx",
        "t5_sdpa_dyn23.onnx",
    ] {
        if let Ok(b) = std::fs::read(models.join(n)) {
            out.push(b);
        }
    }
    out
}

/// Decoding anything, then fusing and inspecting whatever decodes, must not panic.
fn exercise(bytes: Vec<u8>) {
    if let Ok(mut m) = io::decode_model(bytes, "fuzz") {
        let _ = fuse::fuse_model(&mut m.clone(), false);
        let _ = fuse::fuse_model(&mut m, true);
        let _ = io::encode_model(&m);
    }
}

#[test]
fn every_truncation_is_an_error() {
    let b = valid_bytes();
    for len in (0..b.len()).step_by(7) {
        let r = io::decode_model(b[..len].to_vec(), "t");
        if let Err(e) = &r {
            assert!(!e.to_string().is_empty());
        }
        exercise(b[..len].to_vec());
    }
    assert!(io::decode_model(b[..b.len() / 2].to_vec(), "t").is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        exercise(bytes);
    }

    #[test]
    fn mutated_models_never_panic(seed in any::<prop::sample::Index>(), flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let seeds = seeds();
        let mut b = seeds[seed.index(seeds.len())].clone();
        for (i, v) in flips {
            let k = i.index(b.len());
            b[k] = v;
        }
        exercise(b);
    }
}

#[test]
fn not_onnx_and_empty_files_are_clear_errors() {
    let d = tmpdir("bad");
    let p = d.join("x.onnx");
    std::fs::write(&p, b"").unwrap();
    assert!(graph::load_model(&p)
        .err()
        .unwrap()
        .to_string()
        .contains("empty"));
    std::fs::write(&p, b"definitely not a protobuf message at all").unwrap();
    assert!(graph::load_model(&p).is_err());
    assert!(graph::load_model(&d.join("missing.onnx"))
        .err()
        .unwrap()
        .to_string()
        .contains("cannot read"));
}

/// Moves initializer `name` of `m` into `dir/file` as external data at `location`.
fn externalize(m: &mut ModelProto, dir: &Path, location: &str, file: &str) -> String {
    let g = m.graph.as_mut().unwrap();
    let t = g
        .initializer
        .iter_mut()
        .find(|t| t.dims.len() == 2)
        .unwrap();
    let data = t.raw_data.take().unwrap();
    std::fs::write(dir.join(file), &data).unwrap();
    t.data_location = Some(DataLocation::External as i32);
    let kv = |k: &str, v: String| StringStringEntryProto {
        key: Some(k.into()),
        value: Some(v),
    };
    t.external_data = vec![
        kv("location", location.into()),
        kv("offset", "0".into()),
        kv("length", data.len().to_string()),
    ];
    t.name.clone().unwrap()
}

#[test]
fn external_data_stays_external_and_follows_the_output() {
    let src = tmpdir("ext-src");
    let dst = tmpdir("ext-dst");
    let mut m = graph::load_model(&graph_path("fuse_bert_eager.onnx"))
        .unwrap()
        .model;
    let name = externalize(&mut m, &src, "w.bin", "w.bin");
    let model_path = src.join("m.onnx");
    std::fs::write(&model_path, io::encode_model(&m)).unwrap();

    let mut loaded = graph::load_model(&model_path).unwrap();
    assert_eq!(loaded.external_files.len(), 1);
    let rep = fuse::fuse_model(&mut loaded.model, true);
    assert_eq!(rep.fused, 1);
    let out = dst.join("fused.onnx");
    graph::save_model(&loaded.model, &out, &loaded).unwrap();
    assert!(
        dst.join("w.bin").exists(),
        "external file placed beside the output"
    );
    let back = graph::load_model(&out).unwrap();
    let t = back
        .model
        .graph
        .as_ref()
        .unwrap()
        .initializer
        .iter()
        .find(|t| t.name.as_deref() == Some(&name))
        .unwrap();
    assert!(io::is_external(t) && t.raw_data.is_none());
    if flash_ort::verify::runtime::find_ort_library().is_ok() {
        let r = flash_ort::verify::verify(&model_path, &out, &Default::default()).unwrap();
        assert!(r.ok, "{}", r.human());
    }
}

#[test]
fn external_paths_outside_the_folder_are_refused() {
    let d = tmpdir("ext-bad");
    let inner = d.join("model");
    std::fs::create_dir_all(&inner).unwrap();
    for (loc, file, want) in [
        ("../w.bin", "w.bin", "refused"),
        ("/etc/hostname", "w.bin", "refused"),
        ("sub/../../w.bin", "w.bin", "refused"),
        ("nope.bin", "w.bin", "missing"),
    ] {
        let mut m = graph::load_model(&graph_path("fuse_bert_eager.onnx"))
            .unwrap()
            .model;
        externalize(&mut m, &inner, loc, file);
        std::fs::write(d.join("w.bin"), b"x").unwrap();
        let p = inner.join("m.onnx");
        std::fs::write(&p, io::encode_model(&m)).unwrap();
        let err = graph::load_model(&p)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains(want), "{loc}: {err}");
    }
    // A length running past the end of the file.
    let mut m = graph::load_model(&graph_path("fuse_bert_eager.onnx"))
        .unwrap()
        .model;
    externalize(&mut m, &inner, "w2.bin", "w2.bin");
    let t = m
        .graph
        .as_mut()
        .unwrap()
        .initializer
        .iter_mut()
        .find(|t| io::is_external(t))
        .unwrap();
    t.external_data[2].value = Some("99999999".into());
    let p = inner.join("m.onnx");
    std::fs::write(&p, io::encode_model(&m)).unwrap();
    assert!(graph::load_model(&p)
        .err()
        .unwrap()
        .to_string()
        .contains("past the end"));
}

#[test]
fn everything_else_is_kept() {
    let mut loaded = graph::load_model(&graph_path("fuse_bert_eager.onnx")).unwrap();
    let before = loaded.model.clone();
    fuse::fuse_model(&mut loaded.model, true);
    let (a, b) = (
        before.graph.as_ref().unwrap(),
        loaded.model.graph.as_ref().unwrap(),
    );
    assert_eq!(a.input, b.input);
    assert_eq!(a.output, b.output);
    assert_eq!(before.producer_name, loaded.model.producer_name);
    assert_eq!(before.ir_version, loaded.model.ir_version);
    assert_eq!(before.metadata_props, loaded.model.metadata_props);
    // Every weight matrix survives (only small scale/mask constants may go), or lives on in the
    // packed Q/K/V weight (fuse::pack_qkv), whose size is theirs together.
    let elems = |t: &graph::onnx::TensorProto| t.dims.iter().product::<i64>();
    let packed: i64 = b
        .initializer
        .iter()
        .filter(|t| {
            t.name
                .as_deref()
                .is_some_and(|n| n.ends_with("_qkv_weight"))
        })
        .map(elems)
        .sum();
    let gone: Vec<_> = a
        .initializer
        .iter()
        .filter(|t| t.dims.len() == 2 && !b.initializer.contains(t))
        .collect();
    assert_eq!(gone.len(), 3, "Q, K and V weights packed");
    assert_eq!(gone.iter().map(|t| elems(t)).sum::<i64>(), packed);
}

/// Moves every rank-2 initializer of `m` into `dir/weights.bin`, one after another.
fn externalize_weights(m: &mut ModelProto, dir: &Path) -> Vec<String> {
    let mut data = Vec::new();
    let mut names = Vec::new();
    for t in m.graph.as_mut().unwrap().initializer.iter_mut() {
        if t.dims.len() != 2 {
            continue;
        }
        let raw = t.raw_data.take().unwrap();
        let kv = |k: &str, v: String| StringStringEntryProto {
            key: Some(k.into()),
            value: Some(v),
        };
        t.data_location = Some(DataLocation::External as i32);
        t.external_data = vec![
            kv("location", "weights.bin".into()),
            kv("offset", data.len().to_string()),
            kv("length", raw.len().to_string()),
        ];
        data.extend_from_slice(&raw);
        names.push(t.name.clone().unwrap());
    }
    std::fs::write(dir.join("weights.bin"), &data).unwrap();
    names
}

/// Q/K/V weights in external data are packed without being read: a Concat node over them
/// (ONNX Runtime folds it when the session starts), the weights stay external and in the same
/// file, and the fused model gives the original's outputs.
#[test]
fn external_weights_are_packed_by_a_concat_node() {
    let (src, dst) = (tmpdir("pack-src"), tmpdir("pack-dst"));
    let mut m = graph::load_model(&graph_path("fuse_bert_eager.onnx"))
        .unwrap()
        .model;
    let names = externalize_weights(&mut m, &src);
    assert!(names.len() >= 3);
    let model_path = src.join("m.onnx");
    std::fs::write(&model_path, io::encode_model(&m)).unwrap();

    let mut loaded = graph::load_model(&model_path).unwrap();
    let rep = fuse::fuse_model(&mut loaded.model, true);
    assert_eq!((rep.fused, rep.qkv_packed), (1, 1), "{}", rep.human());
    let note = &rep.sites[0].summary.as_ref().unwrap().qkv_pack;
    assert!(
        note.as_ref().unwrap().note.contains("Concat node"),
        "{note:?}"
    );
    let out = dst.join("fused.onnx");
    graph::save_model(&loaded.model, &out, &loaded).unwrap();
    let back = graph::load_model(&out).unwrap();
    let g = back.model.graph.as_ref().unwrap();
    let concat: Vec<_> = g
        .node
        .iter()
        .filter(|n| n.op_type.as_deref() == Some("Concat"))
        .filter(|n| n.input.iter().all(|i| names.contains(i)))
        .collect();
    assert_eq!(concat.len(), 1);
    for name in &concat[0].input {
        let t = g.initializer.iter().find(|t| t.name.as_ref() == Some(name));
        assert!(t.is_some_and(io::is_external), "{name} stays external");
    }
    assert!(
        !g.initializer
            .iter()
            .any(|t| t.dims.len() == 2 && !io::is_external(t)),
        "no weight copied into the model"
    );
    if flash_ort::verify::runtime::find_ort_library().is_ok() {
        let r = flash_ort::verify::verify(&model_path, &out, &Default::default()).unwrap();
        assert!(r.ok, "{}", r.human());
    }
}
