//! flash-ort: FlashAttention-2 as the ONNX Runtime custom operator `com.flash.FlashAttention`
//! (CPU and CUDA execution providers), and the graph tooling behind the `flash-ort` CLI that
//! fuses attention subgraphs of exported models into that operator.
//!
//! The same crate builds the `libflash_ort.so` that ORT hosts load (`RegisterCustomOps` lives in
//! [`ort_abi`]) and the library the CLI and tests use.

pub mod attention;
pub mod error;
pub mod fuse;
pub mod graph;
pub mod ort_abi;
pub mod verify;

#[cfg(feature = "cuda")]
pub mod cuda;

pub use error::{Error, Result};
