//! Every exported model in models/ (listed in models/manifest.json): all its attention sites
//! fused, parity with the original in ONNX Runtime (max abs error ≤ 1e-4, fp32), a second fuse
//! changes nothing, and the output passes onnx.checker.

use std::path::PathBuf;
use std::process::Command;

use flash_ort::{fuse, graph, verify};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// (file, attention sites) of every model the manifest lists as exported.
fn manifest_models() -> Vec<(String, usize)> {
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
            let file = m["file"].as_str().expect("model file").to_string();
            let sites = m["attention_sites"].as_u64().expect("attention_sites") as usize;
            (file, sites)
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
    for (file, sites) in &models {
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
    assert!(
        failures.is_empty(),
        "{} of {} models failed:\n{}",
        failures.len(),
        models.len(),
        failures.join("\n")
    );
}
