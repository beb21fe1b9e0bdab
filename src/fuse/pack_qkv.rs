//! After fusing: a fused site's Q, K and V projections packed into one GEMM. Three
//! `MatMul(X, W)` (each maybe followed by a bias `Add`) become `MatMul(X, [Wq | Wk | Wv])`, one
//! `Add([bq | bk | bv])` and a `Split`: one GEMM launch and one bias pass per layer instead of
//! three each, as ONNX Runtime's own fused attention does. The Split's outputs take the names of
//! the projections' outputs, so every reader (the fused node, or LLaMA's rotary embedding between
//! projection and node) reads the same values as before; only the GEMM's blocking changes, that
//! is floating-point reassociation.
//!
//! The projections are found from the fused node's Q, K and V inputs, back through reshapes,
//! transposes, casts, elementwise ops and rotary embeddings, to exactly one MatMul each. They are
//! packed only when the three read the same X, their weights are rank-2 constant initializers
//! with the same rows and element type that nothing else reads, all three have a bias of their
//! width or none has, and each MatMul/Add output has one reader and is no graph output. Inline
//! weights are concatenated here and the old initializers go, so the model keeps its size.
//! Weights in external data are never loaded: a `Concat` node over the initializers stands in,
//! which ONNX Runtime folds into one constant when the session starts.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use super::plan::{attr_int, attr_ints, is_flash, node, Names};
use crate::graph::onnx::{GraphProto, NodeProto, TensorProto};
use crate::graph::tensor::{elem_width, element_count, int64_tensor, le_bytes};
use crate::graph::view::{is_op, node_label, GraphView};

/// How many tensors the walk from Q, K or V back to its projection visits at most.
const WALK_LIMIT: usize = 64;

/// Every reason a fused site's projections stay as they are (printed by `flash-ort codes`).
pub const CODES: &[(&str, &str)] = &[
    ("qkv-not-projected", "Q, K or V does not come from exactly one MatMul (through reshapes, casts, elementwise ops, rotary embeddings)"),
    ("qkv-already-packed", "one projection already feeds several of Q, K and V"),
    ("qkv-inputs-differ", "the Q, K and V MatMuls read different inputs (cross attention)"),
    ("qkv-weight-not-constant", "a weight is not a rank-2 constant initializer (computed in the graph, or a graph input)"),
    ("qkv-weight-shared", "a weight or bias is also read by other nodes: packing would copy it"),
    ("qkv-weights-mismatch", "the weights differ in rows or element type"),
    ("qkv-bias-mixed", "some of Q, K and V have a bias Add and some do not"),
    ("qkv-intermediate-read-elsewhere", "a MatMul or bias Add output has another reader or is a graph output"),
    ("qkv-split-axis-unknown", "opset below 11 and the projection's rank is unknown (Split needs a non-negative axis)"),
];

/// Why one site was not packed: a code from [`CODES`] and a sentence.
type Fail = (&'static str, String);

/// One projection: `MatMul(x, w)`, maybe followed by `Add(·, b)`.
struct Proj<'g> {
    matmul: usize,
    /// The nodes it replaces: the MatMul, the bias Add, Identities only they read.
    nodes: Vec<usize>,
    /// What its readers read: the Add's output, or the MatMul's when there is no bias.
    out: &'g str,
    x: &'g str,
    w: &'g TensorProto,
    b: Option<&'g TensorProto>,
}

/// A fused node whose projections were packed: the rewrite, applied by [`apply`].
pub struct Packed {
    pub node: String,
    /// What replaced what, for the report.
    pub note: String,
    /// The new nodes go where the first of the three MatMuls was: after X, before every reader.
    at: usize,
    remove: Vec<usize>,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
}

/// A fused node whose projections stay, and why.
pub struct Unpacked {
    pub node: String,
    pub code: &'static str,
    pub detail: String,
}

/// How many leading inputs of `n` carry a projection's values through it (`None`: it does not
/// pass them on). Only data inputs: shape and index inputs lead elsewhere.
fn data_inputs(n: &NodeProto) -> Option<usize> {
    let op = n.op_type.as_deref()?;
    let onnx = matches!(n.domain.as_deref(), None | Some("") | Some("ai.onnx"));
    match op {
        "Add" | "Sub" | "Mul" | "Div" | "Concat" if onnx => Some(n.input.len()),
        "Neg" | "Cast" | "CastLike" | "Identity" | "Reshape" | "Transpose" | "Squeeze"
        | "Unsqueeze" | "Slice" | "Split" | "Expand"
            if onnx =>
        {
            Some(1)
        }
        "RotaryEmbedding" if onnx || n.domain.as_deref() == Some("com.microsoft") => Some(1),
        _ => None,
    }
}

/// The MatMul and Gemm nodes whose outputs reach `t` through pass-through ops (the walk stops
/// at each of them and at constants).
fn upstream_matmuls<'g>(v: &GraphView<'g>, t: &'g str) -> Vec<usize> {
    let mut found = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = vec![t];
    while let Some(t) = stack.pop() {
        if seen.len() >= WALK_LIMIT || !seen.insert(t) {
            continue;
        }
        let Some(p) = v.producer(t) else { continue };
        let n = v.node(p);
        if is_op(n, "MatMul") || is_op(n, "Gemm") {
            if !found.contains(&p) {
                found.push(p);
            }
            continue;
        }
        if let Some(k) = data_inputs(n) {
            stack.extend(
                n.input
                    .iter()
                    .take(k)
                    .filter(|s| !s.is_empty() && v.constant(s).is_none())
                    .map(String::as_str),
            );
        }
    }
    found
}

/// An initializer that no graph input overrides.
fn const_initializer<'g>(v: &GraphView<'g>, name: &str) -> Option<&'g TensorProto> {
    v.constant(name)?;
    v.initializer(name)
}

fn single_reader(v: &GraphView, t: &str) -> bool {
    !v.is_graph_output(t) && v.consumers(t).len() == 1
}

/// A constant operand `name` of node `reader`: an initializer, directly or through an
/// `Identity` (the TorchScript exporter shares equal parameters, such as zero-initialized
/// biases, that way).
struct Operand<'g> {
    t: &'g TensorProto,
    /// The Identity, when only `reader` reads it: it goes with the projection.
    identity: Option<usize>,
    /// Whether anything besides `reader` reads the values.
    shared: bool,
}

fn operand<'g>(v: &GraphView<'g>, name: &str, reader: usize) -> Option<Operand<'g>> {
    let alone = |t: &str, r: usize| !v.is_graph_output(t) && v.consumers(t) == [r];
    if let Some(t) = const_initializer(v, name) {
        let shared = !alone(name, reader);
        return Some(Operand {
            t,
            identity: None,
            shared,
        });
    }
    let id = v.producer_op(name, "Identity")?;
    let src = v.node(id).input.first()?;
    let t = const_initializer(v, src)?;
    let identity = alone(name, reader).then_some(id);
    Some(Operand {
        t,
        identity,
        shared: identity.is_none() || !alone(src, id),
    })
}

/// The bias `Add(mm_out, b)` (either order) reading the MatMul's output, when `b` is a constant
/// rank-1 tensor of the weight's width and type: the Add and `b`.
fn bias_of<'g>(v: &GraphView<'g>, mm_out: &str, w: &TensorProto) -> Option<(usize, Operand<'g>)> {
    let &[a] = v.consumers(mm_out) else {
        return None;
    };
    let n = v.node(a);
    if !is_op(n, "Add") || n.input.len() != 2 || n.output.is_empty() {
        return None;
    }
    let other = match (n.input[0] == mm_out, n.input[1] == mm_out) {
        (true, false) => &n.input[1],
        (false, true) => &n.input[0],
        _ => return None,
    };
    let b = operand(v, other, a)?;
    (b.t.dims[..] == w.dims[1..] && b.t.data_type == w.data_type).then_some((a, b))
}

/// The projection computed by MatMul `mm`, which feeds the fused node's input `what`.
fn projection<'g>(v: &GraphView<'g>, mm: usize, what: &str) -> Result<Proj<'g>, Fail> {
    let n = v.node(mm);
    let label = node_label(n);
    if !is_op(n, "MatMul") || n.input.len() != 2 || n.output.is_empty() {
        let op = n.op_type.as_deref().unwrap_or("?");
        return Err((
            "qkv-not-projected",
            format!("{what} comes from {op} {label}, not a MatMul"),
        ));
    }
    let (x, wname, mm_out) = (&n.input[0], &n.input[1], &n.output[0]);
    let w = operand(v, wname, mm)
        .filter(|w| w.t.dims.len() == 2 && w.t.dims.iter().all(|&d| d > 0))
        .ok_or_else(|| {
            (
                "qkv-weight-not-constant",
                format!("{what}: {label} multiplies by {wname}, not a rank-2 constant initializer"),
            )
        })?;
    // A shared weight would be copied into the packed one; a shared bias is copied too, but
    // it is one row.
    if w.shared {
        return Err((
            "qkv-weight-shared",
            format!("{what}: the weight {wname} of {label} is also read by other nodes"),
        ));
    }
    let bias = bias_of(v, mm_out, w.t);
    let out = bias.as_ref().map_or(mm_out, |(a, _)| &v.node(*a).output[0]);
    if !single_reader(v, mm_out) || !single_reader(v, out) {
        return Err((
            "qkv-intermediate-read-elsewhere",
            format!("{what}: {out} (from {label}) has other readers or is a graph output"),
        ));
    }
    let mut nodes = vec![mm];
    nodes.extend(w.identity);
    if let Some((a, b)) = &bias {
        nodes.push(*a);
        nodes.extend(b.identity);
    }
    Ok(Proj {
        matmul: mm,
        nodes,
        out,
        x,
        w: w.t,
        b: bias.map(|(_, b)| b.t),
    })
}

/// The one MatMul (or Gemm) that input `k` of fused node `i` comes from.
fn source_matmul(v: &GraphView, i: usize, k: usize, what: &str) -> Result<usize, Fail> {
    let t = v.node(i).input.get(k).filter(|s| !s.is_empty());
    let found = t.map(|t| upstream_matmuls(v, t)).unwrap_or_default();
    match found[..] {
        [m] => Ok(m),
        [] => Err((
            "qkv-not-projected",
            format!(
                "{what} does not come from a MatMul through reshapes, casts, elementwise ops or \
                 rotary embeddings"
            ),
        )),
        _ => Err((
            "qkv-not-projected",
            format!(
                "{what} comes from several MatMuls: {}",
                found
                    .iter()
                    .map(|&m| node_label(v.node(m)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// Whether the three projections stack into one: same X, same rows and type, bias all or none.
fn check_stackable(p: &[Proj; 3]) -> Result<(), Fail> {
    if p.iter().any(|q| q.x != p[0].x) {
        return Err((
            "qkv-inputs-differ",
            format!(
                "Q, K and V project different inputs ({}, {}, {})",
                p[0].x, p[1].x, p[2].x
            ),
        ));
    }
    if p.iter()
        .any(|q| q.w.dims[0] != p[0].w.dims[0] || q.w.data_type != p[0].w.data_type)
    {
        let shapes: Vec<String> = p
            .iter()
            .map(|q| format!("{:?} (type {})", q.w.dims, q.w.data_type.unwrap_or(0)))
            .collect();
        return Err((
            "qkv-weights-mismatch",
            format!("the weights {} do not stack", shapes.join(", ")),
        ));
    }
    if p.iter().any(|q| q.b.is_some() != p[0].b.is_some()) {
        return Err((
            "qkv-bias-mixed",
            "only some of Q, K and V have a bias Add".into(),
        ));
    }
    Ok(())
}

/// The fused node's three projections, checked for packing.
fn site_projections<'g>(v: &GraphView<'g>, i: usize) -> Result<[Proj<'g>; 3], Fail> {
    let q = source_matmul(v, i, 0, "Q")?;
    let k = source_matmul(v, i, 1, "K")?;
    let val = source_matmul(v, i, 2, "V")?;
    if q == k || k == val || q == val {
        let shared = if q == k || q == val { q } else { k };
        return Err((
            "qkv-already-packed",
            format!("{} feeds several of Q, K and V", node_label(v.node(shared))),
        ));
    }
    let p = [
        projection(v, q, "Q")?,
        projection(v, k, "K")?,
        projection(v, val, "V")?,
    ];
    check_stackable(&p)?;
    Ok(p)
}

/// `tensors` concatenated along their last axis into one new initializer named `name`, when
/// all are inline and readable.
fn concat_last_axis(tensors: &[&TensorProto], name: String) -> Option<TensorProto> {
    let first = tensors[0];
    let width = elem_width(first.data_type?)?;
    let rows: i64 = first.dims[..first.dims.len() - 1].iter().product();
    let cols: Vec<usize> = tensors
        .iter()
        .map(|t| usize::try_from(*t.dims.last()?).ok())
        .collect::<Option<_>>()?;
    let bytes: Vec<Cow<[u8]>> = tensors.iter().map(|t| le_bytes(t)).collect::<Option<_>>()?;
    let total: usize = tensors
        .iter()
        .map(|t| element_count(t))
        .sum::<Option<usize>>()?;
    let mut raw = Vec::with_capacity(total * width);
    // Row r of the result is row r of each tensor in turn.
    for r in 0..usize::try_from(rows).ok()? {
        for (b, &c) in bytes.iter().zip(&cols) {
            raw.extend_from_slice(&b[r * c * width..(r + 1) * c * width]);
        }
    }
    let mut dims = first.dims.clone();
    *dims.last_mut()? = cols.iter().sum::<usize>() as i64;
    Some(TensorProto {
        name: Some(name),
        dims,
        data_type: first.data_type,
        raw_data: Some(raw.into()),
        ..Default::default()
    })
}

/// New tensors and nodes of one packing, named after the Q projection.
struct Builder<'a> {
    names: &'a mut Names,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    /// Whether a Concat node stands in for an initializer (external or unreadable weights).
    concat_node: bool,
}

impl Builder<'_> {
    /// `tensors` stacked along the last axis into a new tensor named after `base`: a new
    /// initializer, or a Concat node over them.
    fn stacked(&mut self, tensors: &[&TensorProto], base: &str) -> String {
        let name = self.names.fresh(base);
        if let Some(t) = concat_last_axis(tensors, name.clone()) {
            self.initializers.push(t);
            return name;
        }
        self.concat_node = true;
        let inputs = tensors
            .iter()
            .map(|t| t.name.clone().unwrap_or_default())
            .collect();
        let axis = tensors[0].dims.len() as i64 - 1;
        let nm = self.names.fresh(&format!("{name}_concat"));
        self.nodes.push(node(
            "Concat",
            nm,
            inputs,
            vec![name.clone()],
            vec![attr_int("axis", axis)],
        ));
        name
    }

    /// A default-domain node named after `like`, writing a fresh tensor.
    fn push(&mut self, op: &str, like: &str, inputs: Vec<String>) {
        let name = self.names.fresh(&format!("{like}_qkv"));
        let out = self.names.fresh(&format!("{like}_qkv_out"));
        self.nodes.push(node(op, name, inputs, vec![out], vec![]));
    }

    fn last_output(&self) -> String {
        self.nodes
            .last()
            .map_or(String::new(), |n| n.output[0].clone())
    }
}

/// The Split's axis: -1 from opset 11 on (negative axes allowed), else the projection's last
/// axis when its rank is known.
fn split_axis(v: &GraphView, out: &str, opset: i64) -> Option<i64> {
    if opset >= 11 {
        return Some(-1);
    }
    v.rank(out)
        .and_then(|r| i64::try_from(r).ok())
        .map(|r| r - 1)
}

/// The rewrite of fused node `i` whose projections `p` stack.
fn build(
    v: &GraphView,
    i: usize,
    p: &[Proj; 3],
    opset: i64,
    names: &mut Names,
) -> Result<Packed, Fail> {
    let axis = split_axis(v, p[0].out, opset).ok_or_else(|| {
        (
            "qkv-split-axis-unknown",
            format!(
                "opset {opset} needs a non-negative Split axis and the rank of {} is unknown",
                p[0].out
            ),
        )
    })?;
    let mut b = Builder {
        names,
        nodes: Vec::new(),
        initializers: Vec::new(),
        concat_node: false,
    };
    let q_mm = node_label(v.node(p[0].matmul));
    let w = b.stacked(&[p[0].w, p[1].w, p[2].w], &format!("{q_mm}_qkv_weight"));
    b.push("MatMul", &q_mm, vec![p[0].x.to_string(), w]);
    if let (Some(bq), Some(bk), Some(bv)) = (p[0].b, p[1].b, p[2].b) {
        let bias = b.stacked(&[bq, bk, bv], &format!("{q_mm}_qkv_bias"));
        let mm_out = b.last_output();
        b.push("Add", &format!("{q_mm}_bias"), vec![mm_out, bias]);
    }
    let cols: Vec<i64> = p.iter().map(|q| q.w.dims[1]).collect();
    let packed = b.last_output();
    let outs: Vec<String> = p.iter().map(|q| q.out.to_string()).collect();
    let mut inputs = vec![packed];
    let mut attrs = vec![attr_int("axis", axis)];
    // The sizes are an input from opset 13 on, an attribute before.
    if opset >= 13 {
        let sizes = b.names.fresh(&format!("{q_mm}_qkv_split_sizes"));
        b.initializers.push(int64_tensor(&sizes, &[3], &cols));
        inputs.push(sizes);
    } else {
        attrs.push(attr_ints("split", &cols));
    }
    let split = b.names.fresh(&format!("{q_mm}_qkv_split"));
    b.nodes.push(node("Split", split, inputs, outs, attrs));

    let mut remove: Vec<usize> = p.iter().flat_map(|q| q.nodes.iter().copied()).collect();
    remove.sort_unstable();
    let replaced: Vec<String> = remove.iter().map(|&r| node_label(v.node(r))).collect();
    let note = format!(
        "one MatMul [{}, {}]{} + Split {cols:?} replace {}{}",
        p[0].w.dims[0],
        cols.iter().sum::<i64>(),
        if p[0].b.is_some() { " + Add" } else { "" },
        replaced.join(", "),
        if b.concat_node {
            " (weights stacked by a Concat node over the external data, never read here; ORT \
             folds it when the session starts)"
        } else {
            ""
        }
    );
    Ok(Packed {
        node: v.node(i).name.clone().unwrap_or_default(),
        note,
        // Before the first MatMul: X is ready there (an Identity may come before X).
        at: p.iter().map(|q| q.matmul).min().unwrap_or(i),
        remove,
        nodes: b.nodes,
        initializers: b.initializers,
    })
}

/// Every fused node of the graph: those whose projections pack (rewrites for [`apply`]) and the
/// others with the reason. `opset` is the default domain's, for the Split's spelling.
pub fn plans(v: &GraphView, opset: i64) -> (Vec<Packed>, Vec<Unpacked>) {
    let mut names = Names::new(v.graph);
    let mut claimed = HashSet::new();
    let (mut packed, mut unpacked) = (Vec::new(), Vec::new());
    for i in (0..v.graph.node.len()).filter(|&i| is_flash(v.node(i))) {
        let result = site_projections(v, i).and_then(|p| {
            if p.iter().any(|q| claimed.contains(&q.matmul)) {
                return Err((
                    "qkv-already-packed",
                    "its projections are packed for another fused node".into(),
                ));
            }
            build(v, i, &p, opset, &mut names)
        });
        match result {
            Ok(pk) => {
                claimed.extend(pk.remove.iter().copied());
                packed.push(pk);
            }
            Err((code, detail)) => unpacked.push(Unpacked {
                node: v.node(i).name.clone().unwrap_or_default(),
                code,
                detail,
            }),
        }
    }
    (packed, unpacked)
}

/// Applies the packings: new nodes where each first replaced node was, the replaced nodes gone,
/// and the old weights dropped when nothing reads them any more.
pub fn apply(g: &mut GraphProto, packed: Vec<Packed>) {
    if packed.is_empty() {
        return;
    }
    let remove: HashSet<usize> = packed
        .iter()
        .flat_map(|p| p.remove.iter().copied())
        .collect();
    let mut old_reads = HashSet::new();
    let mut old_outputs = HashSet::new();
    for &r in &remove {
        old_reads.extend(g.node[r].input.iter().cloned());
        old_outputs.extend(g.node[r].output.iter().cloned());
    }
    let mut inserts: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    for p in packed {
        inserts.entry(p.at).or_default().extend(p.nodes);
        g.initializer.extend(p.initializers);
    }
    let old = std::mem::take(&mut g.node);
    for (i, n) in old.into_iter().enumerate() {
        if let Some(new) = inserts.remove(&i) {
            g.node.extend(new);
        }
        if !remove.contains(&i) {
            g.node.push(n);
        }
    }
    super::rewrite::drop_unread_initializers(g, &old_reads);
    // The MatMul outputs a bias Add read are no longer produced.
    let produced: HashSet<&str> = g
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(String::as_str))
        .collect();
    let gone: HashSet<String> = old_outputs
        .into_iter()
        .filter(|o| !produced.contains(o.as_str()))
        .collect();
    g.value_info
        .retain(|vi| !vi.name.as_ref().is_some_and(|n| gone.contains(n)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuse::plan::{DOMAIN, OP_TYPE};
    use crate::graph::onnx::{tensor_proto::DataLocation, StringStringEntryProto, ValueInfoProto};

    const H: i64 = 4;

    /// A float initializer whose element k is `base + k`.
    fn init(name: &str, dims: &[i64], base: f32) -> TensorProto {
        let n: i64 = dims.iter().product();
        TensorProto {
            name: Some(name.into()),
            dims: dims.to_vec(),
            data_type: Some(1),
            float_data: (0..n).map(|k| base + k as f32).collect(),
            ..Default::default()
        }
    }

    fn op(op: &str, inputs: &[&str], out: &str) -> NodeProto {
        node(
            op,
            format!("{op}_{out}"),
            inputs.iter().map(|s| s.to_string()).collect(),
            vec![out.into()],
            vec![],
        )
    }

    fn value(name: &str) -> ValueInfoProto {
        ValueInfoProto {
            name: Some(name.into()),
            ..Default::default()
        }
    }

    fn flash(q: &str, k: &str, v: &str) -> NodeProto {
        let mut n = op(OP_TYPE, &[q, k, v], "y");
        n.domain = Some(DOMAIN.into());
        n
    }

    /// BERT after the layout fold: `Add(b, MatMul(x, W))` into the fused node, for Q, K, V.
    fn bert() -> GraphProto {
        let mut g = GraphProto {
            input: vec![value("x")],
            output: vec![value("y")],
            ..Default::default()
        };
        for (k, p) in ["q", "k", "v"].iter().enumerate() {
            let base = 100.0 * k as f32;
            g.initializer.push(init(&format!("w{p}"), &[H, 2], base));
            g.initializer
                .push(init(&format!("b{p}"), &[2], base + 50.0));
            g.node
                .push(op("MatMul", &["x", &format!("w{p}")], &format!("m{p}")));
            // Either operand order.
            let (a, b) = (format!("b{p}"), format!("m{p}"));
            let ins = if k == 1 { [&b, &a] } else { [&a, &b] };
            g.node
                .push(op("Add", &[ins[0].as_str(), ins[1].as_str()], p));
        }
        g.node.push(flash("q", "k", "v"));
        g
    }

    /// LLaMA: no biases, GQA widths, a rotary embedding between the Q/K projections and the
    /// 4D fused node (cos and sin are graph inputs).
    fn llama() -> GraphProto {
        let mut g = GraphProto {
            input: ["x", "cos", "sin", "shape"].map(value).to_vec(),
            output: vec![value("y")],
            ..Default::default()
        };
        for (p, cols) in [("q", 4), ("k", 2), ("v", 2)] {
            g.initializer.push(init(&format!("w{p}"), &[H, cols], 0.0));
            g.node
                .push(op("MatMul", &["x", &format!("w{p}")], &format!("m{p}")));
            let r = format!("r{p}");
            g.node.push(op("Reshape", &[&format!("m{p}"), "shape"], &r));
            g.node.push(op("Transpose", &[&r], &format!("t{p}")));
        }
        for p in ["q", "k"] {
            let t = format!("t{p}");
            g.node.push(op("Mul", &[&t, "cos"], &format!("c{p}")));
            g.node.push(op("Neg", &[&t], &format!("n{p}")));
            g.node
                .push(op("Mul", &[&format!("n{p}"), "sin"], &format!("s{p}")));
            g.node.push(op(
                "Add",
                &[&format!("c{p}"), &format!("s{p}")],
                &format!("rope{p}"),
            ));
        }
        g.node.push(flash("ropeq", "ropek", "tv"));
        g
    }

    fn run(g: &mut GraphProto, opset: i64) -> (usize, Vec<(&'static str, String)>) {
        let (packed, unpacked) = plans(&GraphView::new(g, None), opset);
        let n = packed.len();
        apply(g, packed);
        (
            n,
            unpacked.into_iter().map(|u| (u.code, u.detail)).collect(),
        )
    }

    fn count(g: &GraphProto, op: &str) -> usize {
        g.node.iter().filter(|n| is_op(n, op)).count()
    }

    fn tensor<'a>(g: &'a GraphProto, name: &str) -> Option<&'a TensorProto> {
        g.initializer
            .iter()
            .find(|t| t.name.as_deref() == Some(name))
    }

    fn floats(t: &TensorProto) -> Vec<f32> {
        le_bytes(t)
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    /// The single unpacked reason of `g`.
    fn reason(mut g: GraphProto) -> &'static str {
        let (n, why) = run(&mut g, 17);
        assert_eq!((n, why.len()), (0, 1), "{why:?}");
        why[0].0
    }

    #[test]
    fn bert_projections_with_biases_pack() {
        let mut g = bert();
        let (n, why) = run(&mut g, 17);
        assert_eq!((n, why.len()), (1, 0));
        assert_eq!(
            (count(&g, "MatMul"), count(&g, "Add"), count(&g, "Split")),
            (1, 1, 1)
        );
        // Old weights gone; new ones stacked along the columns, row by row.
        assert!(["wq", "wk", "wv", "bq", "bk", "bv"]
            .iter()
            .all(|t| tensor(&g, t).is_none()));
        let w = tensor(&g, "MatMul_mq_qkv_weight").unwrap();
        assert_eq!(w.dims, [H, 6]);
        assert_eq!(floats(w)[..6], [0.0, 1.0, 100.0, 101.0, 200.0, 201.0]);
        let b = tensor(&g, "MatMul_mq_qkv_bias").unwrap();
        assert_eq!(floats(b), [50.0, 51.0, 150.0, 151.0, 250.0, 251.0]);
        // The Split writes the names the fused node reads, in order, before it.
        let split = g.node.iter().position(|n| is_op(n, "Split")).unwrap();
        assert_eq!(g.node[split].output, ["q", "k", "v"]);
        assert_eq!(
            g.node[split].input.len(),
            2,
            "sizes as an input at opset 17"
        );
        let sizes = tensor(&g, &g.node[split].input[1]).unwrap();
        assert_eq!(sizes.int64_data, [2, 2, 2]);
        assert!(split < g.node.len() - 1 && is_flash(g.node.last().unwrap()));
        // Already packed: a second pass changes nothing.
        assert_eq!(reason(g), "qkv-already-packed");
    }

    #[test]
    fn llama_projections_through_rotary_embedding_pack() {
        let mut g = llama();
        let (n, why) = run(&mut g, 18);
        assert_eq!((n, why.len()), (1, 0), "{why:?}");
        assert_eq!((count(&g, "MatMul"), count(&g, "Split")), (1, 1));
        let split = g.node.iter().find(|n| is_op(n, "Split")).unwrap();
        assert_eq!(split.output, ["mq", "mk", "mv"]);
        let sizes = tensor(&g, &split.input[1]).unwrap();
        assert_eq!(sizes.int64_data, [4, 2, 2]);
        // The head splits and rotary embedding stay, reading the Split's outputs.
        assert_eq!(count(&g, "Reshape"), 3);
        assert_eq!(count(&g, "Neg"), 2);
    }

    #[test]
    fn before_opset_13_split_sizes_are_an_attribute() {
        let mut g = bert();
        assert_eq!(run(&mut g, 12).0, 1);
        let split = g.node.iter().find(|n| is_op(n, "Split")).unwrap();
        assert_eq!(split.input.len(), 1);
        let attr = |a: &str| {
            split
                .attribute
                .iter()
                .find(|x| x.name.as_deref() == Some(a))
        };
        assert_eq!(attr("split").unwrap().ints, [2, 2, 2]);
        assert_eq!(attr("axis").unwrap().i, Some(-1));
    }

    #[test]
    fn external_weights_are_stacked_by_a_concat_node() {
        let mut g = bert();
        let wk = g
            .initializer
            .iter_mut()
            .find(|t| t.name.as_deref() == Some("wk"));
        let wk = wk.unwrap();
        wk.float_data.clear();
        wk.data_location = Some(DataLocation::External as i32);
        wk.external_data = vec![StringStringEntryProto {
            key: Some("location".into()),
            value: Some("w.bin".into()),
        }];
        assert_eq!(run(&mut g, 17).0, 1);
        let concat: Vec<_> = g.node.iter().filter(|n| is_op(n, "Concat")).collect();
        assert_eq!(concat.len(), 1, "weights only: the biases are inline");
        assert_eq!(concat[0].input, ["wq", "wk", "wv"]);
        assert!(tensor(&g, "wk").is_some_and(crate::graph::io::is_external));
        assert!(tensor(&g, "bq").is_none());
    }

    #[test]
    fn a_bias_shared_through_identity_is_copied() {
        // TorchScript shares equal parameters (zero biases) through Identity nodes.
        let mut g = bert();
        g.node.insert(0, op("Identity", &["bk"], "bk_id"));
        g.node.insert(1, op("Identity", &["bk"], "bk_id2"));
        g.node.push(op("Add", &["x", "bk_id2"], "other"));
        g.output.push(value("other"));
        let add_k = g.node.iter_mut().find(|n| n.output == ["k"]).unwrap();
        add_k.input[1] = "bk_id".into();
        assert_eq!(run(&mut g, 17).0, 1);
        assert_eq!(
            count(&g, "Identity"),
            1,
            "the Identity only the bias read goes"
        );
        assert!(tensor(&g, "bk").is_some(), "still read by the other Add");
    }

    #[test]
    fn a_projection_read_elsewhere_stays() {
        let mut g = bert();
        g.node.push(op("Relu", &["mk"], "side"));
        g.output.push(value("side"));
        assert_eq!(reason(g), "qkv-intermediate-read-elsewhere");
    }

    #[test]
    fn different_inputs_stay() {
        let mut g = bert();
        g.input.push(value("x2"));
        g.node[2].input[0] = "x2".into();
        assert_eq!(reason(g), "qkv-inputs-differ");
    }

    #[test]
    fn a_computed_weight_stays() {
        let mut g = bert();
        let wv = g.node.iter().position(|n| n.output == ["mv"]).unwrap();
        g.node.insert(wv, op("Transpose", &["wv"], "wv_t"));
        g.node[wv + 1].input[1] = "wv_t".into();
        assert_eq!(reason(g), "qkv-weight-not-constant");
        // A graph input is no constant either, even with an initializer of its name.
        let mut g = bert();
        g.input.push(value("wq"));
        assert_eq!(reason(g), "qkv-weight-not-constant");
    }

    #[test]
    fn mixed_biases_stay() {
        let mut g = bert();
        let add = g.node.iter().position(|n| n.output == ["v"]).unwrap();
        g.node.remove(add);
        g.node.last_mut().unwrap().input[2] = "mv".into();
        assert_eq!(reason(g), "qkv-bias-mixed");
    }

    #[test]
    fn shared_weights_and_one_projection_feeding_two_inputs_stay() {
        let mut g = bert();
        g.node.push(op("MatMul", &["x", "wk"], "again"));
        g.output.push(value("again"));
        assert_eq!(reason(g), "qkv-weight-shared");
        let mut g = llama();
        let fused = g.node.last_mut().unwrap();
        fused.input[1] = "tv".into();
        assert_eq!(reason(g), "qkv-already-packed");
    }
}
