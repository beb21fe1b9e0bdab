//! A read-only view of one graph: who produces and who consumes each tensor, which tensors are
//! constants or graph outputs, and what shape inference proved about them.

use std::collections::{HashMap, HashSet};

use super::onnx::{GraphProto, NodeProto, TensorProto};
use super::shapes::{self, Dim, Infos};

/// Producer/consumer maps and inferred facts over a borrowed graph.
pub struct GraphView<'g> {
    pub graph: &'g GraphProto,
    producer: HashMap<&'g str, usize>,
    consumers: HashMap<&'g str, Vec<usize>>,
    initializers: HashMap<&'g str, &'g TensorProto>,
    outputs: HashSet<&'g str>,
    pub infos: Infos,
}

/// Every tensor name a node reads, including names its subgraphs read from the outer scope.
fn node_reads<'g>(n: &'g NodeProto, out: &mut Vec<&'g str>) {
    out.extend(n.input.iter().map(String::as_str).filter(|s| !s.is_empty()));
    for a in &n.attribute {
        for g in a.g.iter().chain(a.graphs.iter()) {
            for sub in &g.node {
                node_reads(sub, out);
            }
        }
    }
}

impl<'g> GraphView<'g> {
    /// Builds the view; `outer` is the inference of the enclosing graph, for subgraphs.
    pub fn new(graph: &'g GraphProto, outer: Option<&Infos>) -> Self {
        let mut producer = HashMap::new();
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in graph.node.iter().enumerate() {
            for o in n.output.iter().filter(|s| !s.is_empty()) {
                producer.insert(o.as_str(), i);
            }
            let mut reads = Vec::new();
            node_reads(n, &mut reads);
            reads.sort_unstable();
            reads.dedup();
            for r in reads {
                consumers.entry(r).or_default().push(i);
            }
        }
        let initializers = graph
            .initializer
            .iter()
            .filter_map(|t| t.name.as_deref().map(|n| (n, t)))
            .collect();
        let outputs = graph
            .output
            .iter()
            .filter_map(|o| o.name.as_deref())
            .collect();
        let infos = shapes::infer(graph, outer);
        GraphView {
            graph,
            producer,
            consumers,
            initializers,
            outputs,
            infos,
        }
    }

    pub fn node(&self, i: usize) -> &'g NodeProto {
        &self.graph.node[i]
    }

    /// Index of the node producing `name`, if any (graph inputs and initializers have none).
    pub fn producer(&self, name: &str) -> Option<usize> {
        self.producer.get(name).copied()
    }

    /// The producing node when it has op type `op` in the default domain.
    pub fn producer_op(&self, name: &str, op: &str) -> Option<usize> {
        self.producer(name).filter(|&i| is_op(self.node(i), op))
    }

    /// Indices of the nodes reading `name` (each node once).
    pub fn consumers(&self, name: &str) -> &[usize] {
        self.consumers.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn is_graph_output(&self, name: &str) -> bool {
        self.outputs.contains(name)
    }

    pub fn initializer(&self, name: &str) -> Option<&'g TensorProto> {
        self.initializers.get(name).copied()
    }

    /// The constant tensor behind `name`: an initializer that is not also a graph input (those can
    /// be overridden at run time) or a `Constant` node's `value`.
    pub fn constant(&self, name: &str) -> Option<&'g TensorProto> {
        if let Some(t) = self.initializer(name) {
            let overridable = self
                .graph
                .input
                .iter()
                .any(|i| i.name.as_deref() == Some(name));
            return (!overridable).then_some(t);
        }
        let n = self.node(self.producer_op(name, "Constant")?);
        n.attribute
            .iter()
            .find(|a| a.name.as_deref() == Some("value"))
            .and_then(|a| a.t.as_ref())
    }

    /// A constant float scalar (one element), from a constant or a foldable computation.
    pub fn scalar(&self, name: &str) -> Option<f64> {
        let value = self.infos.get(name)?.scalar?;
        // Only trust values that came from constants or from folding constants (checked only
        // once a value exists: the walk is bounded but wide on data paths).
        self.is_constant_expr(name, 24).then_some(value)
    }

    /// Whether `name` is computed only from constants and `Shape` (no run-time data), so its
    /// inferred value holds for every input.
    pub fn is_constant_expr(&self, name: &str, depth: usize) -> bool {
        if self.constant(name).is_some() {
            return true;
        }
        if depth == 0 {
            return false;
        }
        let Some(i) = self.producer(name) else {
            return false;
        };
        let n = self.node(i);
        if is_op(n, "Shape") {
            return true;
        }
        n.input
            .iter()
            .filter(|s| !s.is_empty())
            .all(|s| self.is_constant_expr(s, depth - 1))
    }

    /// Op types whose outputs have no inferred rank: (op, count, first output), most first.
    pub fn unknown_shapes(&self) -> Vec<(String, usize, String)> {
        let mut by_op: HashMap<String, (usize, String)> = HashMap::new();
        for n in &self.graph.node {
            for o in n
                .output
                .iter()
                .filter(|o| !o.is_empty() && self.rank(o).is_none())
            {
                let e = by_op
                    .entry(n.op_type.clone().unwrap_or_default())
                    .or_insert((0, o.clone()));
                e.0 += 1;
            }
        }
        let mut v: Vec<_> = by_op.into_iter().map(|(k, (c, f))| (k, c, f)).collect();
        v.sort_by_key(|x| std::cmp::Reverse(x.1));
        v
    }

    pub fn dims(&self, name: &str) -> Option<&[Dim]> {
        self.infos.dims(name)
    }
    pub fn rank(&self, name: &str) -> Option<usize> {
        self.infos.rank(name)
    }
    pub fn elem(&self, name: &str) -> Option<i32> {
        self.infos.elem(name)
    }
}

/// Whether `n` is `op` of the default ONNX domain.
pub fn is_op(n: &NodeProto, op: &str) -> bool {
    n.op_type.as_deref() == Some(op)
        && matches!(n.domain.as_deref(), None | Some("") | Some("ai.onnx"))
}

/// An attribute of `n` by name.
pub fn attr<'a>(n: &'a NodeProto, name: &str) -> Option<&'a super::onnx::AttributeProto> {
    n.attribute.iter().find(|a| a.name.as_deref() == Some(name))
}

/// An int attribute.
pub fn attr_i(n: &NodeProto, name: &str) -> Option<i64> {
    attr(n, name).and_then(|a| a.i)
}

/// A float attribute.
pub fn attr_f(n: &NodeProto, name: &str) -> Option<f32> {
    attr(n, name).and_then(|a| a.f)
}

/// An ints attribute.
pub fn attr_ints(n: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(n, name).map(|a| a.ints.clone())
}

/// A name for messages: the node's name, or its op type and first output.
pub fn node_label(n: &NodeProto) -> String {
    match n.name.as_deref() {
        Some(s) if !s.is_empty() => s.to_string(),
        _ => format!(
            "{}({})",
            n.op_type.as_deref().unwrap_or("?"),
            n.output.first().map(String::as_str).unwrap_or("")
        ),
    }
}
