//! Structural checks the rest of the crate relies on: every node of an op we reason about has the
//! inputs and outputs that op requires (a malformed file is refused here, so the matcher can index
//! a Transpose's input 0 without a crash).

use super::onnx::{ModelProto, NodeProto};

/// (op, required inputs, required outputs) for the default-domain ops the matcher and the shape
/// inference read by position. Required inputs must also be non-empty names.
const ARITY: &[(&str, usize, usize)] = &[
    ("Add", 2, 1),
    ("And", 2, 1),
    ("Attention", 3, 1),
    ("Cast", 1, 1),
    ("CastLike", 2, 1),
    ("Concat", 1, 1),
    ("Constant", 0, 1),
    ("ConstantOfShape", 1, 1),
    ("Div", 2, 1),
    ("Dropout", 1, 1),
    ("Equal", 2, 1),
    ("Expand", 2, 1),
    ("Flatten", 1, 1),
    ("Gather", 2, 1),
    ("Gemm", 2, 1),
    ("Greater", 2, 1),
    ("GreaterOrEqual", 2, 1),
    ("Identity", 1, 1),
    ("IsNaN", 1, 1),
    ("Less", 2, 1),
    ("LessOrEqual", 2, 1),
    ("MatMul", 2, 1),
    ("Mul", 2, 1),
    ("Not", 1, 1),
    ("Or", 2, 1),
    ("Pow", 2, 1),
    ("Range", 3, 1),
    ("Reshape", 2, 1),
    ("Shape", 1, 1),
    ("Slice", 1, 1),
    ("Softmax", 1, 1),
    ("Split", 1, 1),
    ("Sqrt", 1, 1),
    ("Squeeze", 1, 1),
    ("Sub", 2, 1),
    ("Tanh", 1, 1),
    ("Transpose", 1, 1),
    ("Trilu", 1, 1),
    ("Unsqueeze", 1, 1),
    ("Where", 3, 1),
];

fn check_node(n: &NodeProto, where_: &str) -> Result<(), String> {
    if !matches!(n.domain.as_deref(), None | Some("") | Some("ai.onnx")) {
        return Ok(());
    }
    let op = n.op_type.as_deref().unwrap_or("");
    let Some(&(_, ins, outs)) = ARITY.iter().find(|(o, _, _)| *o == op) else {
        return Ok(());
    };
    let name = n.name.as_deref().filter(|s| !s.is_empty()).unwrap_or(op);
    if n.input.len() < ins || n.input[..ins].iter().any(String::is_empty) {
        return Err(format!(
            "{where_}: node '{name}' ({op}) has {} inputs, needs {ins}",
            n.input.len()
        ));
    }
    if n.output.len() < outs || n.output[..outs].iter().any(String::is_empty) {
        return Err(format!("{where_}: node '{name}' ({op}) has no output"));
    }
    Ok(())
}

/// Checks `nodes` and, recursively, the subgraphs in their attributes.
fn check_nodes(nodes: &[NodeProto], where_: &str) -> Result<(), String> {
    for n in nodes {
        check_node(n, where_)?;
        for a in &n.attribute {
            for sub in a.g.iter().chain(a.graphs.iter()) {
                check_nodes(
                    &sub.node,
                    &format!("{where_}/{}", a.name.as_deref().unwrap_or("?")),
                )?;
            }
        }
    }
    Ok(())
}

/// Checks every graph, subgraph and function body of `m`.
pub fn check_model(m: &ModelProto) -> Result<(), String> {
    if let Some(g) = &m.graph {
        check_nodes(&g.node, "graph")?;
    }
    for f in &m.functions {
        check_nodes(
            &f.node,
            &format!("function {}", f.name.as_deref().unwrap_or("?")),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transpose_without_input_is_refused() {
        let n = NodeProto {
            op_type: Some("Transpose".into()),
            output: vec!["y".into()],
            ..Default::default()
        };
        let g = crate::graph::onnx::GraphProto {
            node: vec![n],
            ..Default::default()
        };
        let m = ModelProto {
            graph: Some(g),
            ..Default::default()
        };
        assert!(check_model(&m).unwrap_err().contains("needs 1"));
    }
}
