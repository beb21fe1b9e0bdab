//! The CLI's exit codes and messages: 0 success, 1 verify mismatch, 2 error.

use std::path::PathBuf;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_flash-ort"))
}

fn graph_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/graphs")
        .join(name)
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flash-ort-cli-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn have_ort() -> bool {
    flash_ort::verify::runtime::find_ort_library().is_ok()
}

#[test]
fn fuse_writes_model_and_report() {
    let d = tmpdir("fuse");
    let out = d.join("o.onnx");
    let rep = d.join("r.json");
    let o = bin()
        .args([
            "fuse",
            graph_path("fuse_softcap.onnx").to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--report",
            rep.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("1 fused"), "{stdout}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&rep).unwrap()).unwrap();
    assert_eq!(json["fused"], 1);
    assert_eq!(json["sites"][0]["status"], "fused");
    assert_eq!(json["sites"][0]["summary"]["softcap"], 30.0);
}

#[test]
fn inspect_names_the_reason_and_node() {
    let o = bin()
        .args([
            "inspect",
            graph_path("skip_dropout-in-training.onnx")
                .to_str()
                .unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(
        s.contains("dropout-in-training") && s.contains("Dropout_"),
        "{s}"
    );
    let o = bin()
        .args([
            "inspect",
            "--json",
            graph_path("fuse_bert_eager.onnx").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(json["fused"], 1);
}

#[test]
fn zero_fusions_exit_zero_with_a_hint() {
    let d = tmpdir("zero");
    let o = bin()
        .args([
            "fuse",
            graph_path("skip_scale-not-constant.onnx").to_str().unwrap(),
            "-o",
            d.join("o.onnx").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).contains("flash-ort inspect"));
}

#[test]
fn bad_files_exit_two_with_one_message() {
    let d = tmpdir("bad");
    let junk = d.join("junk.onnx");
    std::fs::write(&junk, b"\x0a\xff\xff\xff\xff\x0f garbage").unwrap();
    let truncated = d.join("trunc.onnx");
    let full = std::fs::read(graph_path("fuse_bert_eager.onnx")).unwrap();
    std::fs::write(&truncated, &full[..full.len() / 3]).unwrap();
    for p in [junk, truncated, d.join("missing.onnx")] {
        for cmd in ["inspect", "fuse"] {
            let mut c = bin();
            c.args([cmd, p.to_str().unwrap()]);
            if cmd == "fuse" {
                c.args(["-o", d.join("x.onnx").to_str().unwrap()]);
            }
            let o = c.output().unwrap();
            assert_eq!(o.status.code(), Some(2), "{cmd} {}", p.display());
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                err.starts_with("flash-ort: ") && !err.contains("panicked"),
                "{err}"
            );
        }
    }
    let o = bin().args(["fuse"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "usage errors are errors");
}

#[test]
fn verify_exit_codes() {
    if !have_ort() {
        eprintln!("ONNX Runtime not found: verify exit codes not checked");
        return;
    }
    let d = tmpdir("verify");
    let a = graph_path("fuse_bert_eager.onnx");
    let out = d.join("fused.onnx");
    let o = bin()
        .args([
            "fuse",
            a.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--verify",
        ])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("max abs"));

    // A wrong scale must be caught: exit 1.
    let mut m = flash_ort::graph::load_model(&out).unwrap().model;
    for n in m
        .graph
        .as_mut()
        .unwrap()
        .node
        .iter_mut()
        .filter(|n| n.domain.as_deref() == Some("com.flash"))
    {
        for at in n
            .attribute
            .iter_mut()
            .filter(|at| at.name.as_deref() == Some("scale"))
        {
            at.f = at.f.map(|f| f * 2.0);
        }
    }
    let wrong = d.join("wrong.onnx");
    std::fs::write(&wrong, flash_ort::graph::io::encode_model(&m)).unwrap();
    let o = bin()
        .args(["verify", a.to_str().unwrap(), wrong.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("MISMATCH"));
}

#[test]
fn version_still_works() {
    let o = bin().arg("version").output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("flash-ort "));
}

#[test]
fn verify_provider_cuda_needs_a_cuda_build_of_ort() {
    let a = graph_path("fuse_bert_eager.onnx");
    let o = bin()
        .args(["verify", a.to_str().unwrap(), a.to_str().unwrap()])
        .args(["--provider", "tpu"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("expected cpu or cuda"));
    if !have_ort() {
        return;
    }
    let o = bin()
        .args(["verify", a.to_str().unwrap(), a.to_str().unwrap()])
        .args(["--provider", "cuda"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    // The CPU wheel (CI) has no CUDA EP: a clear error, never a silent CPU run. A CUDA build of
    // ORT on a GPU machine runs and compares.
    match o.status.code() {
        Some(2) => assert!(err.contains("no CUDA execution provider"), "{err}"),
        Some(0) => {}
        c => panic!("exit {c:?}: {err}"),
    }
}

/// By default the K/V bias Adds of ORT-optimized BERT are folded away (so Q alone keeps a bias
/// and packing declines); `--no-fold-bias` packs the projections, `--no-pack-qkv` with it keeps
/// everything apart. The report counts each.
#[test]
fn bias_fold_and_packing_switches() {
    let d = tmpdir("pack");
    let run = |extra: &[&str]| {
        let (out, rep) = (d.join("o.onnx"), d.join("r.json"));
        let o = bin()
            .args([
                "fuse",
                graph_path("fuse_ort_optimized_bert.onnx").to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
                "--report",
                rep.to_str().unwrap(),
            ])
            .args(extra)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(0));
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&rep).unwrap()).unwrap();
        (String::from_utf8_lossy(&o.stdout).into_owned(), json)
    };
    let (stdout, json) = run(&[]);
    assert_eq!(json["bias_folded"], 3);
    assert_eq!(json["qkv_packed"], 0);
    let summary = &json["sites"][0]["summary"];
    assert_eq!(summary["qkv_pack"]["reason"], "qkv-bias-mixed");
    let fold = summary["bias_fold"].as_str().unwrap();
    assert!(fold.contains("K bias") && fold.contains("V bias"), "{fold}");
    assert!(
        stdout.contains("3 with K/V bias Adds folded away"),
        "{stdout}"
    );
    let (stdout, json) = run(&["--no-fold-bias"]);
    assert_eq!(json["bias_folded"], 0);
    assert_eq!(json["qkv_packed"], 3);
    assert_eq!(json["sites"][0]["summary"]["qkv_pack"]["packed"], true);
    assert!(json["sites"][0]["summary"].get("bias_fold").is_none());
    assert!(
        stdout.contains("3 with Q/K/V projections packed"),
        "{stdout}"
    );
    let (stdout, json) = run(&["--no-pack-qkv", "--no-fold-bias"]);
    assert_eq!(json["qkv_packed"], 0);
    assert!(json["sites"][0]["summary"].get("qkv_pack").is_none());
    assert!(
        !stdout.contains("qkv") && !stdout.contains("folded away"),
        "{stdout}"
    );
    let help = bin().args(["fuse", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    assert!(help.contains("--no-pack-qkv") && help.contains("--no-fold-bias"));
}
