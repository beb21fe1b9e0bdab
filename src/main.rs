//! The `flash-ort` command line: flags, help and exit codes only; the work lives in the library.
//! Exit codes: 0 success, 1 `verify` found a mismatch, 2 error.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use flash_ort::{fuse, graph, verify};

#[derive(Parser)]
#[command(
    name = "flash-ort",
    version,
    about = "FlashAttention for ONNX Runtime: fuse, inspect and verify attention in ONNX models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the version and the path of the operator library (libflash_ort.so) to register with ORT.
    Version,
    /// Rewrite every attention site of IN into com.flash.FlashAttention and write OUT.
    #[command(
        long_about = "Rewrite every attention site of IN into one com.flash.FlashAttention node each and \
        write OUT. Sites that fail a check are left as they were; the summary says why. External-data \
        weights are never loaded: OUT references the same files (linked beside OUT when it is written \
        to another folder). Each fused site's Q, K and V projections (three MatMuls of one input, \
        with or without bias Adds) are packed into one MatMul, one Add and a Split, as ONNX \
        Runtime's own attention does; --no-pack-qkv keeps them apart. Before that, K's bias Add is \
        dropped (softmax ignores a per-query constant) and V's is folded into the output \
        projection's bias where every row's probabilities sum to one; --no-fold-bias keeps both."
    )]
    Fuse {
        /// The ONNX model to rewrite.
        input: PathBuf,
        /// Where to write the rewritten model.
        #[arg(short, long)]
        output: PathBuf,
        /// Run IN and OUT in ONNX Runtime on generated inputs and compare (exit 1 on mismatch).
        #[arg(long)]
        verify: bool,
        /// Write the per-site report as JSON.
        #[arg(long, value_name = "FILE.json")]
        report: Option<PathBuf>,
        /// Max abs error `--verify` accepts for float32 outputs (float16 gets 100×).
        #[arg(long, default_value_t = 1e-4)]
        tolerance: f64,
        /// Execution provider `--verify` runs both models on: cpu, or cuda (TF32 off; needs the
        /// onnxruntime-gpu libonnxruntime.so in ORT_DYLIB_PATH).
        #[arg(long, default_value = "cpu", value_name = "cpu|cuda")]
        provider: verify::runtime::Provider,
        /// Keep each fused site's Q, K and V projections as three MatMuls (by default they are
        /// packed into one MatMul + Add + Split).
        #[arg(long)]
        no_pack_qkv: bool,
        /// Keep the K and V bias Adds (by default, in the 3D layout, K's is dropped and V's is
        /// folded into the output projection's bias).
        #[arg(long)]
        no_fold_bias: bool,
    },
    /// List every attention site of a model: fusable or not, and why.
    Inspect {
        /// The ONNX model to inspect.
        input: PathBuf,
        /// Print the report as JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Also list, on stderr, the ops whose output shapes could not be inferred (why a site
        /// may say rank-unknown).
        #[arg(long)]
        debug_shapes: bool,
    },
    /// Run A and B in ONNX Runtime on the same generated inputs; report max abs/rel error per output.
    Verify {
        /// The reference model (its inputs decide the generated data).
        a: PathBuf,
        /// The model to compare with A (same input and output names).
        b: PathBuf,
        /// Max abs error accepted for float32 outputs (float16 gets 100×).
        #[arg(long, default_value_t = 1e-4)]
        tolerance: f64,
        /// Operator library to register (default: libflash_ort.so beside this binary).
        #[arg(long)]
        library: Option<PathBuf>,
        /// Print the comparison as JSON.
        #[arg(long)]
        json: bool,
        /// Execution provider both models run on: cpu, or cuda (TF32 off; needs the
        /// onnxruntime-gpu libonnxruntime.so in ORT_DYLIB_PATH).
        #[arg(long, default_value = "cpu", value_name = "cpu|cuda")]
        provider: verify::runtime::Provider,
    },
    /// List the skip reason codes (and why Q/K/V projections stay unpacked) and what they mean.
    Codes,
}

/// Writes to stdout; a closed pipe (`flash-ort codes | head`) ends the program quietly, as
/// command-line tools do, instead of panicking.
fn write_out(args: std::fmt::Arguments) {
    use std::io::Write;
    if let Err(e) = std::io::stdout().lock().write_fmt(args) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("flash-ort: cannot write to stdout: {e}");
        std::process::exit(2);
    }
}

macro_rules! out {
    ($($a:tt)*) => { write_out(format_args!($($a)*)) };
}

macro_rules! outln {
    ($($a:tt)*) => {{ write_out(format_args!($($a)*)); write_out(format_args!("\n")); }};
}

/// The operator library built beside this binary (cargo puts both in the same target folder).
fn library_path() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let candidate = exe.parent()?.join("libflash_ort.so");
    candidate.exists().then_some(candidate)
}

fn run_verify(
    a: &Path,
    b: &Path,
    tolerance: f64,
    library: Option<PathBuf>,
    json: bool,
    provider: verify::runtime::Provider,
) -> Result<bool> {
    let opts = verify::Options {
        tolerance,
        op_lib: library,
        provider,
        ..Default::default()
    };
    let rep = verify::verify(a, b, &opts)
        .with_context(|| format!("verifying {} against {}", b.display(), a.display()))?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        out!("{}", rep.human());
    }
    Ok(rep.ok)
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Version => {
            outln!("flash-ort {}", env!("CARGO_PKG_VERSION"));
            match library_path() {
                Some(p) => outln!("library: {}", p.display()),
                None => outln!(
                    "library: not found beside this binary (build with `cargo build --release`)"
                ),
            }
        }
        Command::Fuse {
            input,
            output,
            verify,
            report,
            tolerance,
            provider,
            no_pack_qkv,
            no_fold_bias,
        } => {
            let mut loaded = graph::load_model(&input)?;
            let opts = fuse::Options {
                apply: true,
                pack_qkv: !no_pack_qkv,
                fold_bias: !no_fold_bias,
            };
            let rep = fuse::fuse_model_with(&mut loaded.model, &opts);
            graph::save_model(&loaded.model, &output, &loaded)?;
            out!("{}", rep.human());
            if rep.fused == 0 {
                outln!(
                    "nothing fused; `flash-ort inspect {}` lists each site's reason",
                    input.display()
                );
            }
            if let Some(path) = report {
                std::fs::write(&path, serde_json::to_string_pretty(&rep)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            outln!("wrote {}", output.display());
            if verify && !run_verify(&input, &output, tolerance, None, false, provider)? {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Inspect {
            input,
            json,
            debug_shapes,
        } => {
            let mut loaded = graph::load_model(&input)?;
            if debug_shapes {
                if let Some(g) = loaded.model.graph.as_ref() {
                    for (op, n, first) in graph::view::GraphView::new(g, None).unknown_shapes() {
                        eprintln!("shape unknown: {n:>4} output(s) of {op} (first: {first})");
                    }
                }
            }
            let rep = fuse::fuse_model(&mut loaded.model, false);
            if json {
                outln!("{}", serde_json::to_string_pretty(&rep)?);
            } else {
                out!("{}", rep.human());
            }
        }
        Command::Verify {
            a,
            b,
            tolerance,
            library,
            json,
            provider,
        } => {
            if !run_verify(&a, &b, tolerance, library, json, provider)? {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Codes => {
            for (code, what) in fuse::reason::CODES.iter().chain(fuse::pack_qkv::CODES) {
                outln!("{code:<36} {what}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("flash-ort: {e:#}");
            ExitCode::from(2)
        }
    }
}
