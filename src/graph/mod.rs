//! ONNX model I/O and a graph view (producers, consumers, constants, inferred shapes). Knows
//! nothing about attention.

pub mod io;
pub mod onnx;
pub mod shapes;
pub mod tensor;
pub mod validate;
pub mod view;

pub use io::{load_model, save_model, LoadedModel};
pub use shapes::{Dim, Infos};
pub use view::GraphView;
