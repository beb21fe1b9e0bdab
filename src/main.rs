//! The `flash-ort` command line: flags, help and exit codes only; the work lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
}

/// The operator library built beside this binary (cargo puts both in the same target folder).
fn library_path() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let candidate = exe.parent()?.join("libflash_ort.so");
    candidate.exists().then_some(candidate)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("flash-ort {}", env!("CARGO_PKG_VERSION"));
            match library_path() {
                Some(p) => println!("library: {}", p.display()),
                None => println!(
                    "library: not found beside this binary (build with `cargo build --release`)"
                ),
            }
            ExitCode::SUCCESS
        }
    }
}
