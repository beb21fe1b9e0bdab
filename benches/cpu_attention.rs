//! `cargo bench --bench cpu_attention`: GFLOP/s and peak memory of the CPU kernel against ONNX
//! Runtime's unfused graph and `com.microsoft.MultiHeadAttention`, plus our operator inside ORT,
//! for S ∈ {256, 1024, 4096, 16384}, D = 64, 8 heads, batch 1, fp32, non-causal.
//!
//! Every (implementation, S) runs in its own process — this binary re-invoked with `--child`,
//! or `benches/peers_cpu.py` for the ORT rows — so each peak RSS is that case's alone. Writes
//! the table to `bench/results/cpu.md` (`bench/out/cpu.md` when `FLASH_BENCH_SIZES` narrows the
//! run).
//!
//! Environment: `FLASH_BENCH_SIZES` (e.g. `256,1024`), `FLASH_BENCH_ROUNDS` (default 5),
//! `FLASH_BENCH_THREADS` (default: all cores), `FLASH_ORT_PYTHON` (default `.venv/bin/python`),
//! `FLASH_ORT_LIB` (default `target/release/libflash_ort.so`, rebuilt first).

use flash_ort::attention::{
    cpu, validate, AttentionAttrs, CpuInputs, ElemType, Elems, ElemsMut, InputDescs, TensorDesc,
    ThreadScope,
};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const HEADS: usize = 8;
const HEAD_DIM: usize = 64;

/// Peak resident set of this process in MiB (VmHWM).
fn peak_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Nanoseconds this thread has spent on a CPU (`/proc/thread-self/schedstat`): with one
/// thread, flops per CPU-second stay meaningful on a machine shared with other jobs.
fn thread_cpu_ns() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(f64::NAN)
}

/// CPU seconds this process has used, all threads (utime + stime of `/proc/self/stat`, in
/// clock ticks of 1/100 s).
fn process_cpu_secs() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the parenthesized command name; utime and stime are 14 and 15.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some(ticks / 100.0)
        })
        .unwrap_or(f64::NAN)
}

/// Child: times our kernel called directly, on `threads` scoped threads.
fn child(s: usize, threads: usize) -> Result<Value, String> {
    let base = peak_mib();
    let shape = [1, HEADS as i64, s as i64, HEAD_DIM as i64];
    let desc = || Some(TensorDesc::new(ElemType::F32, &shape));
    let inputs = InputDescs {
        q: desc(),
        k: desc(),
        v: desc(),
        ..Default::default()
    };
    let p = validate(&AttentionAttrs::default(), &inputs).map_err(|e| e.to_string())?;
    let n = HEADS * s * HEAD_DIM;
    // A cheap deterministic fill in [-1, 1); the values do not change the work done.
    let fill = |seed: u32| -> Vec<f32> {
        let mut x = seed.wrapping_mul(2_654_435_761).max(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    };
    let (q, k, v) = (fill(1), fill(2), fill(3));
    let mut y = vec![0.0f32; n];
    let inp = CpuInputs {
        q: Elems::F32(&q),
        k: Elems::F32(&k),
        k_strides: p.k_strides,
        v: Elems::F32(&v),
        v_strides: p.v_strides,
        mask: None,
        nonpad_kv_seqlen: None,
    };
    let pool = ThreadScope(threads);
    let mut run =
        || cpu::attention(&p, &inp, ElemsMut::F32(&mut y), &pool).map_err(|e| e.to_string());
    run()?;
    let mut times = Vec::new();
    let cpu0 = thread_cpu_ns();
    let proc0 = process_cpu_secs();
    let start = Instant::now();
    while times.len() < 2 || (start.elapsed().as_secs_f64() < 1.5 && times.len() < 50) {
        let t = Instant::now();
        run()?;
        times.push(t.elapsed().as_secs_f64());
    }
    let cpu_ns = (thread_cpu_ns() - cpu0) / times.len() as f64;
    let proc_secs = (process_cpu_secs() - proc0) / times.len() as f64;
    times.sort_by(f64::total_cmp);
    // The fastest iteration: the one least disturbed by other jobs on this shared machine.
    let sec = times[0];
    let flops = 4.0 * (HEADS * s * s * HEAD_DIM) as f64;
    let per_cpu = (threads == 1).then(|| flops / cpu_ns);
    Ok(
        json!({"impl": "flash", "s": s, "gflops": flops / sec / 1e9, "secs": sec,
              "iters": times.len(), "peak_mib": peak_mib(), "base_mib": base,
              "thread_cpu_gflops": per_cpu, "cpu_gflops": flops / proc_secs / 1e9}),
    )
}

fn mem_available_gib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(16.0, |kb| kb / (1024.0 * 1024.0))
}

/// Runs one case in a child process and returns its JSON line, or why it failed.
fn run_case(root: &Path, imp: &str, s: usize, threads: usize) -> Result<Value, String> {
    let mut cmd = if imp == "flash" {
        let mut c = Command::new(std::env::current_exe().map_err(|e| e.to_string())?);
        c.args(["--child", &s.to_string(), &threads.to_string()]);
        c
    } else {
        let py = std::env::var_os("FLASH_ORT_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join(".venv/bin/python"));
        let lib = std::env::var_os("FLASH_ORT_LIB")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target/release/libflash_ort.so"));
        let mut c = Command::new(py);
        c.arg(root.join("benches/peers_cpu.py"))
            .args([imp, &s.to_string(), &threads.to_string()])
            .arg(lib);
        c
    };
    // The unfused graph materializes 8·S² scores: cap its address space below what is free so
    // an oversized case fails cleanly instead of pushing the machine into the OOM killer.
    let cap = (mem_available_gib() * 0.85).max(1.0);
    cmd.env("FLASH_BENCH_MEM_LIMIT_GB", format!("{cap:.1}"));
    let out = cmd.output().map_err(|e| format!("could not start: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
    {
        Some(v) if out.status.success() => Ok(v),
        _ => {
            let err = String::from_utf8_lossy(&out.stderr);
            let why = err
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            Err(format!(
                "failed ({}; address space capped at {cap:.1} GiB): {}",
                out.status,
                why.chars().take(160).collect::<String>()
            ))
        }
    }
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1).map(|x| x.trim().to_string()))
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        let s = args.get(2).and_then(|x| x.parse().ok()).unwrap_or(256);
        let t = args.get(3).and_then(|x| x.parse().ok()).unwrap_or(1);
        match child(s, t) {
            Ok(v) => println!("{v}"),
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        }
        return;
    }
    // `cargo bench` passes `--bench`; nothing else is expected.
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if std::env::var_os("FLASH_ORT_LIB").is_none() {
        // `cargo bench` builds the rlib it links, not the cdylib ORT loads: bring
        // target/release/libflash_ort.so up to date so the "op in ORT" rows run this code.
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let built = Command::new(cargo)
            .args(["build", "--release", "--lib", "--quiet"])
            .current_dir(&root)
            .status();
        if !matches!(built, Ok(s) if s.success()) {
            eprintln!("warning: `cargo build --release --lib` failed; the op-in-ORT rows may use a stale library");
        }
    }
    let sizes: Vec<usize> = std::env::var("FLASH_BENCH_SIZES")
        .unwrap_or_else(|_| "256,1024,4096,16384".into())
        .split(',')
        .filter_map(|x| x.trim().parse().ok())
        .collect();
    let threads = std::env::var("FLASH_BENCH_THREADS")
        .ok()
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let rounds: usize = std::env::var("FLASH_BENCH_ROUNDS")
        .ok()
        .and_then(|x| x.parse().ok())
        .unwrap_or(5);
    let mut ort_version = String::from("?");
    let unit_before = tile_unit_state();
    let rows = measure(&root, &sizes, threads, rounds, &mut ort_version);
    // One thread each, S ≤ 4096: throughput per CPU-second is then a per-core figure that
    // time-sharing with other jobs barely moves (no pool threads spinning, nothing to wait on).
    let small: Vec<usize> = sizes.iter().copied().filter(|&s| s <= 4096).collect();
    let single = if threads > 1 {
        measure(&root, &small, 1, 3, &mut ort_version)
    } else {
        Vec::new()
    };
    // The op and both ORT peers at the same moments (one process, in turn), up to S = 4096:
    // beyond, the unfused graph's S² scores make each round take seconds.
    let paired: Vec<(usize, Result<Value, String>)> = sizes
        .iter()
        .filter(|&&s| s <= 4096)
        .map(|&s| {
            let r = run_case(&root, "paired", s, threads);
            match &r {
                Ok(v) => eprintln!(
                    "{threads}T paired S={s:>6} {} rounds: op / unfused {:.2}×, op / MHA {:.2}× (medians)",
                    v["rounds"], v["op_vs_unfused"]["median"].as_f64().unwrap_or(f64::NAN),
                    v["op_vs_mha"]["median"].as_f64().unwrap_or(f64::NAN)
                ),
                Err(e) => eprintln!("{threads}T paired S={s:>6} {e}"),
            }
            (s, r)
        })
        .collect();
    let unit_after = tile_unit_state();
    let mut md = table(&rows, &single, &paired, threads, rounds, &ort_version);
    if let (Some(a), Some(b)) = (unit_before, unit_after) {
        md += &format!(
            "\nState of this core's AMX tile unit (`cpu::tile_product_cycles`, {UNIT_SAMPLES} samples {UNIT_GAP_MS} ms apart): at full rate in {a} of them before the run, {b} after. A shared host's other tenants halve the rate while they use the sibling hyperthread's tile unit; the op's figures drop with it, ORT's FMA-based peers much less.\n"
        );
    }
    println!("{md}");
    // A partial run (custom sizes) goes to the git-ignored bench/out/, not over the record.
    let dir = if std::env::var_os("FLASH_BENCH_SIZES").is_some() {
        root.join("bench/out")
    } else {
        root.join("bench/results")
    };
    let path = dir.join("cpu.md");
    if let Err(e) = std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&path, &md)) {
        eprintln!("could not write {}: {e}", path.display());
    } else {
        eprintln!("wrote {}", path.display());
    }
}

const UNIT_SAMPLES: usize = 40;
const UNIT_GAP_MS: u64 = 25;
/// Full rate is 16 TSC cycles per tile product on Sapphire Rapids; half rate about 31.
const FULL_RATE_CYCLES: f64 = 20.0;

/// How many of [`UNIT_SAMPLES`] samples of the tile unit found it at full rate (`None`
/// without AMX).
fn tile_unit_state() -> Option<usize> {
    let mut full = 0;
    for _ in 0..UNIT_SAMPLES {
        if cpu::tile_product_cycles()? < FULL_RATE_CYCLES {
            full += 1;
        }
        std::thread::sleep(std::time::Duration::from_millis(UNIT_GAP_MS));
    }
    eprintln!("tile unit at full rate in {full} of {UNIT_SAMPLES} samples");
    Some(full)
}

type Row = (usize, Vec<Result<Value, String>>);

const IMPLS: [(&str, &str); 4] = [
    ("flash", "flash-ort kernel (direct)"),
    ("flash_op", "flash-ort op in ORT"),
    ("mha", "ORT MultiHeadAttention"),
    ("unfused", "ORT unfused graph"),
];

/// Runs every implementation at every size for `rounds` interleaved rounds and keeps each
/// case's fastest round: other jobs share this machine, and a slow round measures them.
fn measure(
    root: &Path,
    sizes: &[usize],
    threads: usize,
    rounds: usize,
    ort_version: &mut String,
) -> Vec<Row> {
    let mut rows: Vec<Row> = sizes.iter().map(|&s| (s, Vec::new())).collect();
    for round in 0..rounds.max(1) {
        for (s, row) in rows.iter_mut() {
            let s = *s;
            // Seconds per iteration at S = 16384: two rounds keep the whole run near 10 minutes.
            if round >= 2 && s >= 16384 {
                continue;
            }
            for (idx, (imp, label)) in IMPLS.iter().enumerate() {
                if let Some(prev) = row.get(idx) {
                    // Once is enough for a failed case, or one that takes minutes or many GiB
                    // (the unfused graph at S = 16384 squeezes everything else on the machine).
                    let heavy = prev.as_ref().map_or(true, |v| {
                        v["secs"].as_f64().unwrap_or(0.0) * v["iters"].as_f64().unwrap_or(1.0)
                            > 60.0
                            || v["peak_mib"].as_f64().unwrap_or(0.0) > 4096.0
                    });
                    if heavy {
                        continue;
                    }
                }
                let r = run_case(root, imp, s, threads);
                match &r {
                    Ok(v) => {
                        if let Some(o) = v.get("ort").and_then(Value::as_str) {
                            *ort_version = o.to_string();
                        }
                        eprintln!(
                            "{threads}T round {round} S={s:>6} {label:<28} {:>8.1} GFLOP/s  {:>8.3} s  peak {:>9.1} MiB",
                            v["gflops"].as_f64().unwrap_or(f64::NAN),
                            v["secs"].as_f64().unwrap_or(f64::NAN),
                            v["peak_mib"].as_f64().unwrap_or(f64::NAN)
                        )
                    }
                    Err(e) => eprintln!("{threads}T round {round} S={s:>6} {label:<28} {e}"),
                }
                let gf = |x: &Result<Value, String>| {
                    x.as_ref()
                        .ok()
                        .and_then(|v| v["gflops"].as_f64())
                        .unwrap_or(-1.0)
                };
                match row.get_mut(idx) {
                    None => row.push(r),
                    Some(best) if gf(&r) > gf(best) => *best = r,
                    Some(_) => {}
                }
            }
        }
    }
    rows
}

fn table(
    rows: &[Row],
    single: &[Row],
    paired: &[(usize, Result<Value, String>)],
    threads: usize,
    rounds: usize,
    ort_version: &str,
) -> String {
    let g = |r: &Result<Value, String>, k: &str| r.as_ref().ok().and_then(|v| v[k].as_f64());
    let fmt =
        |x: Option<f64>, prec: usize| x.map_or("failed".to_string(), |x| format!("{x:.prec$}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "–".into(),
    };
    let mut md = String::new();
    md += "# CPU attention forward: flash-ort vs ONNX Runtime\n\n";
    md += &format!(
        "`cargo bench --bench cpu_attention`; {} · {threads} threads (ORT `intra_op_num_threads` = {threads}) · onnxruntime {ort_version} · fp32, batch 1, 8 heads, D = 64, non-causal · GFLOP/s = 4·B·H·S²·D / fastest iteration's time (≥ 1.5 s of iterations after a warm-up) · best of {rounds} interleaved rounds (other jobs share the machine) · each case in its own process, peak memory = its max RSS (the ORT rows include Python + ORT, about {} MiB before any tensor).\n\n",
        cpu_name(),
        rows.iter().flat_map(|(_, r)| r.iter().skip(1)).find_map(|r| g(r, "base_mib")).map_or("?".into(), |b| format!("{b:.0}"))
    );
    md += "| S | flash-ort kernel | flash-ort op in ORT | ORT MultiHeadAttention | ORT unfused graph | op / MHA | op / unfused | peak MiB: kernel | op in ORT | MHA | unfused | op / unfused memory |\n";
    md += "|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for (s, r) in rows {
        let gf: Vec<Option<f64>> = r.iter().map(|x| g(x, "gflops")).collect();
        let mem: Vec<Option<f64>> = r.iter().map(|x| g(x, "peak_mib")).collect();
        md += &format!(
            "| {s} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            fmt(gf[0], 1),
            fmt(gf[1], 1),
            fmt(gf[2], 1),
            fmt(gf[3], 1),
            ratio(gf[1], gf[2]),
            ratio(gf[1], gf[3]),
            fmt(mem[0], 0),
            fmt(mem[1], 0),
            fmt(mem[2], 0),
            fmt(mem[3], 0),
            match (mem[1], mem[3]) {
                (Some(a), Some(b)) if b > 0.0 => format!("1/{:.1}", b / a),
                _ => "–".into(),
            },
        );
    }
    // GFLOP per CPU-second: the same columns for the all-threads and the one-thread runs.
    let cpu_table = |rows: &[Row]| {
        let mut md = String::new();
        md += "| S | flash-ort kernel | flash-ort op in ORT | ORT MultiHeadAttention | ORT unfused graph | op / MHA | op / unfused |\n";
        md += "|---|---|---|---|---|---|---|\n";
        for (s, r) in rows {
            let c: Vec<Option<f64>> = r.iter().map(|x| g(x, "cpu_gflops")).collect();
            md += &format!(
                "| {s} | {} | {} | {} | {} | {} | {} |\n",
                fmt(c[0], 1),
                fmt(c[1], 1),
                fmt(c[2], 1),
                fmt(c[3], 1),
                ratio(c[1], c[2]),
                ratio(c[1], c[3]),
            );
        }
        md
    };
    md += "\nThe same runs in GFLOP per second of process CPU time (all threads; ORT's pool spins while waiting, which counts): a view less sensitive to other jobs taking turns on the cores.\n\n";
    md += &cpu_table(rows);
    if !single.is_empty() {
        md += "\nOne thread each (ORT `intra_op_num_threads` = 1; best of 3 rounds): GFLOP per CPU-second of the process, i.e. per-core throughput, which other jobs sharing the cores barely disturb. One core's fp32 FMA peak here is about 130 GFLOP/s (measured with a register-only FMA loop).\n\n";
        md += &cpu_table(single);
    }
    if !paired.is_empty() {
        md += &format!("\nAt the same moments (`benches/peers_cpu.py paired`, {threads} threads): the op in ORT, ORT's unfused graph and MultiHeadAttention in one process, one iteration of each in turn for 20 s. Ratios of the times within each round, median and middle half: the host's state changes within seconds, and times taken moments apart share it.\n\n");
        md += "| S | rounds | op / unfused | op / MHA | median GFLOP/s: op in ORT | unfused | MHA |\n";
        md += "|---|---|---|---|---|---|---|\n";
        for (s, r) in paired {
            let Ok(v) = r else {
                md += &format!("| {s} | failed | | | | | |\n");
                continue;
            };
            let spread = |k: &str| {
                let q = |p: &str| v[k][p].as_f64().unwrap_or(f64::NAN);
                format!("{:.2}× ({:.2}–{:.2})", q("median"), q("p25"), q("p75"))
            };
            let med = |k: &str| fmt(v["median_gflops"][k].as_f64(), 1);
            md += &format!(
                "| {s} | {} | {} | {} | {} | {} | {} |\n",
                v["rounds"],
                spread("op_vs_unfused"),
                spread("op_vs_mha"),
                med("flash_op"),
                med("unfused"),
                med("mha"),
            );
        }
    }
    let failures: Vec<String> = rows
        .iter()
        .chain(single)
        .flat_map(|(s, r)| {
            r.iter()
                .filter_map(move |x| x.as_ref().err().map(|e| format!("- S={s}: {e}")))
        })
        .collect();
    if !failures.is_empty() {
        md += "\nFailed cases:\n";
        md += &failures.join("\n");
        md += "\n";
    }
    md
}
