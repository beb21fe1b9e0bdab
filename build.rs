//! Build script. Without the `cuda` feature it does nothing: the CPU operator and the CLI are
//! plain Rust and build on any machine.
//!
//! With `cuda` it compiles the CUDA part:
//! - `kernels/*.cu` with nvcc, one process per file (the forward kernel has one generated file
//!   per head size × dtype, see `kernels/generate_kernels.py`), at most `FLASH_ORT_NVCC_JOBS`
//!   at a time (default: cargo's job count). This is the slow part (about 5 s per file and
//!   architecture); objects are reused when neither their source, the kernel headers nor the
//!   flags changed, so touching `cpp/` or Rust code does not recompile kernels.
//! - the cxx bridge (`src/cuda/mod.rs`) and `cpp/bridge.cc` with the host C++ compiler.
//! - links the CUDA runtime statically (`libcudart_static.a`), so `libflash_ort.so` loads on a
//!   machine without a GPU; the driver (libcuda) is only opened at run time.
//!
//! Environment:
//! - `FLASH_ORT_CUDA_HOME`: the CUDA tree (bin/nvcc, include/, lib/libcudart_static.a). Default:
//!   the PyPI toolchain that `scripts/setup_cuda_toolchain.sh` installs into `.venv-cuda/`, then
//!   `CUDA_HOME`/`CUDA_PATH`, then `/usr/local/cuda`.
//! - `FLASH_ORT_CUDA_ARCHS`: `;`- or `,`-separated SM targets (default `80;90a`).
//! - `FLASH_ORT_NVCC_FLAGS`: extra nvcc flags, space-separated (e.g. `-Xptxas -v`).
//! - `FLASH_ORT_CUDA_HDIMS`: head sizes to instantiate (default `32,64,96,128,192,256`); a dev
//!   build can use e.g. `128` alone. Problems round their head size up to the next one built.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        if let Err(e) = cuda::build() {
            // A build script reports failure by panicking; the message is all the user sees.
            panic!("flash-ort: building the CUDA part failed: {e}");
        }
    }
}

mod cuda {
    use super::*;
    use std::process::Command;
    use std::time::SystemTime;

    const ALL_HDIMS: [u32; 6] = [32, 64, 96, 128, 192, 256];

    pub fn build() -> Result<(), String> {
        for var in [
            "FLASH_ORT_CUDA_HOME",
            "FLASH_ORT_CUDA_ARCHS",
            "FLASH_ORT_CUDA_HDIMS",
            "FLASH_ORT_NVCC_JOBS",
            "FLASH_ORT_NVCC_FLAGS",
            "CUDA_HOME",
            "CUDA_PATH",
        ] {
            println!("cargo:rerun-if-env-changed={var}");
        }
        let manifest = PathBuf::from(env("CARGO_MANIFEST_DIR")?);
        let out = PathBuf::from(env("OUT_DIR")?);
        let home = find_cuda_home(&manifest)?;
        let nvcc = home.join("bin").join("nvcc");
        let include = home.join("include");
        let libdir = home.join("lib");
        let libdir = if libdir.join("libcudart_static.a").exists() {
            libdir
        } else {
            home.join("lib64")
        };
        if !libdir.join("libcudart_static.a").exists() {
            return Err(format!(
                "libcudart_static.a not found under {} (lib/ or lib64/)",
                home.display()
            ));
        }

        let archs = archs()?;
        let hdims = hdims()?;
        let kernels = manifest.join("kernels");
        let mut sources = vec![kernels.join("flash_aux.cu")];
        for d in &hdims {
            for dt in ["fp16", "bf16"] {
                sources.push(kernels.join(format!("flash_fwd_hdim{d}_{dt}.cu")));
            }
        }
        let headers = [
            "flash_params.h",
            "flash_api.h",
            "flash_fwd_kernel.cuh",
            "flash_fwd_launch.cuh",
            "flash_fwd_sm90.cuh",
            "flash_fwd_sm90_ws.cuh",
            "wgmma_ops.cuh",
        ]
        .map(|h| kernels.join(h));
        for f in sources.iter().chain(headers.iter()) {
            println!("cargo:rerun-if-changed={}", f.display());
        }

        // nvcc flags; the object cache key includes them.
        let mut flags: Vec<String> = vec![
            "-std=c++17".into(),
            "-O3".into(),
            "-Xcompiler".into(),
            "-fPIC".into(),
            "--expt-relaxed-constexpr".into(),
            "-lineinfo".into(),
        ];
        for a in &archs {
            let num = a.trim_end_matches('a');
            flags.push(format!("-gencode=arch=compute_{a},code=sm_{a}"));
            // PTX of the plain (non-`a`) target, so newer GPUs can JIT it.
            if a == archs.last().unwrap() && !a.ends_with('a') {
                flags.push(format!("-gencode=arch=compute_{num},code=compute_{num}"));
            }
        }
        // Host code picks the Hopper kernel only where its sm_90a code exists.
        if archs.iter().any(|a| a == "90a") {
            flags.push("-DFLASH_ORT_SM90A=1".into());
        }
        if let Ok(extra) = std::env::var("FLASH_ORT_NVCC_FLAGS") {
            flags.extend(extra.split_whitespace().map(String::from));
        }
        let flags_key = format!("{}|{}", nvcc.display(), flags.join(" "));
        let newest_header = headers
            .iter()
            .filter_map(|h| mtime(h))
            .max()
            .unwrap_or(SystemTime::UNIX_EPOCH);

        // Objects live beside the profiles (target/flash-ort-kernels/), not in OUT_DIR, so that
        // `cargo build --release`, `cargo clippy` and `cargo test` share one compile: device code
        // does not depend on the Rust profile.
        // One folder per flag set, so dev builds with other archs/flags don't evict these.
        let objdir = kernel_cache_dir(&out).join(format!("{:016x}", fnv1a(flags_key.as_bytes())));
        std::fs::create_dir_all(&objdir).map_err(|e| e.to_string())?;
        let stamp = objdir.join("flags.txt");
        let flags_same = std::fs::read_to_string(&stamp).ok().as_deref() == Some(&flags_key);
        let jobs = std::env::var("FLASH_ORT_NVCC_JOBS")
            .ok()
            .or_else(|| std::env::var("NUM_JOBS").ok())
            .and_then(|j| j.parse::<usize>().ok())
            .unwrap_or(2)
            .max(1);

        let mut todo = Vec::new();
        let mut objects = Vec::new();
        for src in &sources {
            let obj = objdir.join(
                src.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .replace(".cu", ".o"),
            );
            let fresh = flags_same
                && match (mtime(&obj), mtime(src)) {
                    (Some(o), Some(s)) => o > s && o > newest_header,
                    _ => false,
                };
            if !fresh {
                todo.push((src.clone(), obj.clone()));
            }
            objects.push(obj);
        }
        compile_parallel(&nvcc, &flags, &kernels, &todo, jobs)?;
        std::fs::write(&stamp, &flags_key).map_err(|e| e.to_string())?;

        // Archive the kernel objects.
        let lib = out.join("libflash_ort_kernels.a");
        let _ = std::fs::remove_file(&lib);
        let ar = std::env::var("AR").unwrap_or_else(|_| "ar".into());
        let status = Command::new(&ar)
            .arg("crs")
            .arg(&lib)
            .args(&objects)
            .status()
            .map_err(|e| format!("running {ar}: {e}"))?;
        if !status.success() {
            return Err(format!("{ar} failed to archive the kernel objects"));
        }

        // The cxx bridge and the host launch code.
        let mut bridge = cxx_build::bridge("src/cuda/mod.rs");
        bridge
            .file("cpp/bridge.cc")
            .std("c++17")
            .include(&include)
            .flag_if_supported("-Wno-unused-parameter")
            .opt_level(2);
        for d in &hdims {
            bridge.define(&format!("FLASH_ORT_HDIM_{d}"), None);
        }
        bridge.compile("flash_ort_bridge");
        for f in ["cpp/bridge.cc", "cpp/bridge.h", "src/cuda/mod.rs"] {
            println!("cargo:rerun-if-changed={f}");
        }

        // Link order: bridge (emitted by compile above) -> kernels -> static cudart -> system.
        println!("cargo:rustc-link-search=native={}", out.display());
        println!("cargo:rustc-link-lib=static=flash_ort_kernels");
        println!("cargo:rustc-link-search=native={}", libdir.display());
        println!("cargo:rustc-link-lib=static=cudart_static");
        for l in ["dl", "rt", "pthread", "stdc++"] {
            println!("cargo:rustc-link-lib={l}");
        }
        Ok(())
    }

    /// `<target dir>/flash-ort-kernels`: OUT_DIR is `<target>/[<triple>/]<profile>/build/<pkg>/out`.
    fn kernel_cache_dir(out: &Path) -> PathBuf {
        if let Ok(t) = std::env::var("CARGO_TARGET_DIR") {
            return PathBuf::from(t).join("flash-ort-kernels");
        }
        match out.ancestors().nth(4) {
            Some(t) if t.join("CACHEDIR.TAG").exists() || t.ends_with("target") => {
                t.join("flash-ort-kernels")
            }
            _ => out.join("kernels"),
        }
    }

    fn fnv1a(bytes: &[u8]) -> u64 {
        bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x100000001b3)
        })
    }

    fn env(name: &str) -> Result<String, String> {
        std::env::var(name).map_err(|_| format!("{name} is not set"))
    }

    fn mtime(p: &Path) -> Option<SystemTime> {
        std::fs::metadata(p).and_then(|m| m.modified()).ok()
    }

    fn find_cuda_home(manifest: &Path) -> Result<PathBuf, String> {
        let mut tried = Vec::new();
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Ok(h) = std::env::var("FLASH_ORT_CUDA_HOME") {
            candidates.push(h.into());
        }
        // The venv of scripts/setup_cuda_toolchain.sh (any python version).
        if let Ok(rd) = std::fs::read_dir(manifest.join(".venv-cuda").join("lib")) {
            for e in rd.flatten() {
                candidates.push(e.path().join("site-packages/nvidia/cu13"));
            }
        }
        for var in ["CUDA_HOME", "CUDA_PATH"] {
            if let Ok(h) = std::env::var(var) {
                candidates.push(h.into());
            }
        }
        candidates.push("/usr/local/cuda".into());
        for c in candidates {
            if c.join("bin").join("nvcc").exists() {
                return Ok(c);
            }
            tried.push(c.display().to_string());
        }
        Err(format!(
            "no CUDA toolchain found (tried {}); run scripts/setup_cuda_toolchain.sh or set FLASH_ORT_CUDA_HOME",
            tried.join(", ")
        ))
    }

    fn archs() -> Result<Vec<String>, String> {
        let raw = std::env::var("FLASH_ORT_CUDA_ARCHS").unwrap_or_else(|_| "80;90a".into());
        let archs: Vec<String> = raw
            .split([';', ','])
            .map(|s| s.trim().trim_start_matches("sm_").to_string())
            .filter(|s| !s.is_empty())
            .collect();
        for a in &archs {
            let num = a.trim_end_matches('a');
            if num.parse::<u32>().map_or(true, |n| n < 80) {
                return Err(format!(
                    "FLASH_ORT_CUDA_ARCHS: {a:?} is not an SM target >= 80 (e.g. 80;90a)"
                ));
            }
        }
        if archs.is_empty() {
            return Err("FLASH_ORT_CUDA_ARCHS is empty".into());
        }
        Ok(archs)
    }

    fn hdims() -> Result<Vec<u32>, String> {
        let Ok(raw) = std::env::var("FLASH_ORT_CUDA_HDIMS") else {
            return Ok(ALL_HDIMS.to_vec());
        };
        let mut out = Vec::new();
        for s in raw
            .split([';', ','])
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            match s.parse::<u32>() {
                Ok(d) if ALL_HDIMS.contains(&d) => out.push(d),
                _ => {
                    return Err(format!(
                        "FLASH_ORT_CUDA_HDIMS: {s:?} is not one of {ALL_HDIMS:?}"
                    ))
                }
            }
        }
        if out.is_empty() {
            return Err("FLASH_ORT_CUDA_HDIMS is empty".into());
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Runs nvcc on each (source, object) pair, at most `jobs` at a time.
    fn compile_parallel(
        nvcc: &Path,
        flags: &[String],
        include: &Path,
        todo: &[(PathBuf, PathBuf)],
        jobs: usize,
    ) -> Result<(), String> {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let errors = std::sync::Mutex::new(Vec::<String>::new());
        std::thread::scope(|s| {
            for _ in 0..jobs.min(todo.len()) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Some((src, obj)) = todo.get(i) else {
                        break;
                    };
                    let res = Command::new(nvcc)
                        .args(flags)
                        .arg("-I")
                        .arg(include)
                        .arg("-c")
                        .arg(src)
                        .arg("-o")
                        .arg(obj)
                        .output();
                    let msg = match res {
                        Ok(o) if o.status.success() => continue,
                        Ok(o) => format!(
                            "nvcc failed on {}:\n{}{}",
                            src.display(),
                            String::from_utf8_lossy(&o.stdout),
                            String::from_utf8_lossy(&o.stderr)
                        ),
                        Err(e) => format!("cannot run {}: {e}", nvcc.display()),
                    };
                    let _ = std::fs::remove_file(obj);
                    errors.lock().unwrap().push(msg);
                });
            }
        });
        let errors = errors.into_inner().unwrap();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("\n"))
        }
    }
}
