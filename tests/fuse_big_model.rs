//! `fuse` on a synthetic 200-layer encoder whose weights (0.16 GB and 2.5 GB) are external data
//! (scripts/synth_big_model.py; sparse files, so nothing is written to disk): every site fused,
//! under 2 s, and peak memory the same for both sizes (the weights are never read).

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `fuse` on a generated model; returns (seconds, peak RSS in KB when /usr/bin/time exists).
fn fuse_synthetic(py: &PathBuf, hidden: u32, heads: u32) -> (f64, Option<u64>) {
    let dir = std::env::temp_dir().join(format!("flash-ort-big-{hidden}-{}", std::process::id()));
    let gen = Command::new(py)
        .arg(repo().join("scripts/synth_big_model.py"))
        .arg(&dir)
        .args([
            "--layers",
            "200",
            "--hidden",
            &hidden.to_string(),
            "--heads",
            &heads.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        gen.status.success(),
        "{}",
        String::from_utf8_lossy(&gen.stderr)
    );
    let (model, out, report) = (
        dir.join("model.onnx"),
        dir.join("fused.onnx"),
        dir.join("report.json"),
    );
    let args = [
        "fuse",
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ];
    let bin = env!("CARGO_BIN_EXE_flash-ort");
    let timer = std::path::Path::new("/usr/bin/time");
    let start = Instant::now();
    let o = if timer.exists() {
        Command::new(timer)
            .args(["-f", "peak_rss_kb=%M", bin])
            .args(args)
            .output()
            .unwrap()
    } else {
        Command::new(bin).args(args).output().unwrap()
    };
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(
        (json["fused"].as_u64(), json["skipped"].as_u64()),
        (Some(200), Some(0))
    );
    let rss = String::from_utf8_lossy(&o.stderr).lines().find_map(|l| {
        l.strip_prefix("peak_rss_kb=")
            .and_then(|v| v.trim().parse().ok())
    });
    let _ = std::fs::remove_dir_all(&dir);
    (secs, rss)
}

#[test]
fn two_hundred_layers_with_external_weights_fuse_fast_in_constant_memory() {
    let py = repo().join(".venv/bin/python");
    if !py.exists() {
        eprintln!(".venv missing: synthetic model not generated");
        return;
    }
    let (t_small, rss_small) = fuse_synthetic(&py, 128, 2);
    let (t_big, rss_big) = fuse_synthetic(&py, 512, 8);
    eprintln!("0.16 GB: {t_small:.2} s, {rss_small:?} KB; 2.5 GB: {t_big:.2} s, {rss_big:?} KB");
    assert!(t_big < 2.0, "fuse took {t_big:.2} s on the 2.5 GB model");
    if let (Some(a), Some(b)) = (rss_small, rss_big) {
        // 16× the weights, same memory (within noise): nothing scales with the weights.
        assert!(b < a + 8 * 1024, "peak RSS {a} KB → {b} KB");
        assert!(b < 256 * 1024, "peak RSS {b} KB");
    }
}
