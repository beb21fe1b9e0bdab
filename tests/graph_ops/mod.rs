//! Node counts of a model's main graph, shared by the fuse test crates.

use flash_ort::graph::onnx::ModelProto;

/// Nodes of type `op` in the main graph.
pub fn op_count(m: &ModelProto, op: &str) -> usize {
    m.graph
        .as_ref()
        .unwrap()
        .node
        .iter()
        .filter(|n| n.op_type.as_deref() == Some(op))
        .count()
}

/// The projection ops of a graph: (MatMul, Add, Split).
pub fn projection_ops(m: &ModelProto) -> (usize, usize, usize) {
    (
        op_count(m, "MatMul"),
        op_count(m, "Add"),
        op_count(m, "Split"),
    )
}
