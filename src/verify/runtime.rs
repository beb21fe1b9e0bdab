//! Finding and loading ONNX Runtime (the `ort` crate, `load-dynamic`) and the operator library,
//! and opening sessions with it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::{builder::GraphOptimizationLevel, Session};

use crate::{Error, Result};

static ENV: OnceLock<std::result::Result<Environment, String>> = OnceLock::new();

/// Candidate roots to search for the repo's `.venv` and build outputs: the current folder, the
/// executable's ancestors and the crate's source folder.
fn roots() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(d) = std::env::current_dir() {
        out.push(d);
    }
    if let Ok(exe) = std::env::current_exe() {
        out.extend(exe.ancestors().skip(1).take(5).map(Path::to_path_buf));
    }
    out.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    out
}

/// `libonnxruntime.so`: `ORT_DYLIB_PATH`, else the onnxruntime wheel inside a `.venv` of the repo.
pub fn find_ort_library() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return Ok(PathBuf::from(p));
    }
    for root in roots() {
        let lib = root.join(".venv/lib");
        let Ok(rd) = std::fs::read_dir(&lib) else {
            continue;
        };
        for py in rd.flatten() {
            let capi = py.path().join("site-packages/onnxruntime/capi");
            let Ok(files) = std::fs::read_dir(&capi) else {
                continue;
            };
            let mut found: Vec<PathBuf> = files
                .flatten()
                .map(|f| f.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("libonnxruntime.so"))
                })
                .collect();
            found.sort();
            if let Some(p) = found.pop() {
                return Ok(p);
            }
        }
    }
    Err(Error::Other(
        "ONNX Runtime not found: set ORT_DYLIB_PATH to libonnxruntime.so (e.g. from the onnxruntime Python wheel), or create .venv with onnxruntime".into(),
    ))
}

/// `libflash_ort.so`: `FLASH_ORT_LIB`, else beside the executable or in `target/{release,debug}`.
pub fn find_operator_library() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FLASH_ORT_LIB") {
        return Some(PathBuf::from(p));
    }
    let mut cands = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        cands.extend(
            exe.ancestors()
                .skip(1)
                .take(2)
                .map(|d| d.join("libflash_ort.so")),
        );
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    cands.push(root.join("target/release/libflash_ort.so"));
    cands.push(root.join("target/debug/libflash_ort.so"));
    cands.into_iter().find(|p| p.exists())
}

/// The process-wide ORT environment (ORT allows one per process).
pub fn environment() -> Result<&'static Environment> {
    let env = ENV.get_or_init(|| {
        let lib = find_ort_library().map_err(|e| e.to_string())?;
        ort::init_from(&lib)
            .map_err(|e| format!("cannot load ONNX Runtime from {}: {e}", lib.display()))?
            .with_name("flash-ort")
            .build()
            .map_err(|e| format!("cannot create the ONNX Runtime environment: {e}"))
    });
    env.as_ref().map_err(|e| Error::Other(e.clone()))
}

/// Where a verification runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Provider {
    #[default]
    Cpu,
    /// ORT's CUDA EP (device 0), TF32 off so that an unfused fp32 graph is an exact reference.
    Cuda,
}

impl std::str::FromStr for Provider {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(Provider::Cpu),
            "cuda" => Ok(Provider::Cuda),
            other => Err(format!("unknown provider '{other}' (expected cpu or cuda)")),
        }
    }
}

/// Opens `model` on the CPU EP with graph optimizations off (the graphs are compared as written),
/// registering `op_lib` when given.
pub fn open_session(model: &Path, op_lib: Option<&Path>, threads: usize) -> Result<Session> {
    open_session_on(model, op_lib, threads, Provider::Cpu)
}

/// Like [`open_session`], on the given execution provider. Asking for CUDA from an ONNX Runtime
/// build without it (the CPU `onnxruntime` wheel) is an error, never a silent CPU run.
pub fn open_session_on(
    model: &Path,
    op_lib: Option<&Path>,
    threads: usize,
    provider: Provider,
) -> Result<Session> {
    use ort::ep::ExecutionProvider;
    let env = environment()?;
    let ort_err = |e: ort::Error<_>| Error::Other(format!("{}: {e}", model.display()));
    let mut b = Session::builder(env).map_err(|e| Error::Other(e.to_string()))?;
    if provider == Provider::Cuda {
        let lib = find_ort_library()?;
        let available = ort::ep::CUDA::is_available()
            .map_err(|e| Error::Other(format!("cannot list ONNX Runtime's providers: {e}")))?;
        if !available {
            return Err(Error::NotImplemented(format!(
                "the ONNX Runtime loaded from {} has no CUDA execution provider; set \
                 ORT_DYLIB_PATH to the libonnxruntime.so of the onnxruntime-gpu package",
                lib.display()
            )));
        }
        b = b
            .with_execution_providers([ort::ep::CUDA::default()
                .with_tf32(false)
                .build()
                .error_on_failure()])
            .map_err(|e| Error::Other(format!("cannot register the CUDA EP: {e}")))?;
    }
    b = b
        .with_optimization_level(GraphOptimizationLevel::Disable)
        .map_err(ort_err)?;
    b = b.with_intra_threads(threads).map_err(ort_err)?;
    if let Some(lib) = op_lib {
        b = b.with_operator_library(lib).map_err(|e| {
            Error::Other(format!(
                "cannot register operator library {}: {e}",
                lib.display()
            ))
        })?;
    }
    // ONNX Runtime adds a custom op domain to the process-wide ONNX schema registry with a
    // check-then-insert that is not thread-safe: two sessions loading the operator library at
    // once can fail with "the domain is already exist". Sessions that register it are created
    // one at a time.
    static CUSTOM_DOMAIN_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = op_lib.map(|_| {
        CUSTOM_DOMAIN_LOCK
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    });
    b.commit_from_file(model)
        .map_err(|e| Error::Other(format!("ONNX Runtime cannot load {}: {e}", model.display())))
}
