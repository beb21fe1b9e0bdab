//! Build script. Without the `cuda` feature it does nothing: the CPU operator and the CLI are
//! plain Rust. With `cuda`, the CUDA part (cxx bridge, cpp/, kernels/) is compiled here.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
}
