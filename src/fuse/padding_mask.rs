//! After fusing: a padding mask that the exporter spelled as an index gather, read from the
//! 2-D mask itself. Hugging Face's masking utilities write the key padding mask as
//! `attention_mask[batch_idx, kv_idx]`, which TorchScript exports as
//!
//! ```text
//! Reshape(Gather(Flatten(M, axis=2), b·S + j, axis=0), Shape(b·S + j))   (maybe more Reshapes)
//! ```
//!
//! with `b = Range(0, B)` and `j = Range(0, S)` moved onto their axes by Unsqueezes and M the
//! bool [B, S] mask. Element for element that is `Unsqueeze(M, the other axes)`; the fused
//! node's mask is rebuilt over that. What goes is a chain of shape arithmetic (Shape, Gather,
//! Range, Unsqueeze, Mul, Add, Concat, Flatten, Reshape) that ONNX Runtime runs at every call
//! before the first layer, partly on the CPU with copies to the device, and the `Shape` of the
//! embedding output it starts from, which keeps ORT's EmbedLayerNormalization fusion from
//! matching. Measured on BERT-base (H200, fp16, batch 1, S = 2048, interleaved with ORT's own
//! fused path at 1.74-1.75 ms): 1.76 ms before, 1.68 ms after, with ORT's optimizer fusing the
//! embedding as well; the model also became capturable as a CUDA graph
//! (bench/results/bert_vs_ort_h200_1522.md).

use std::collections::{BTreeMap, HashSet};

use super::causal::arange_axis;
use super::plan::{self, is_flash, Names};
use crate::graph::onnx::{tensor_proto::DataType, GraphProto, NodeProto};
use crate::graph::shapes::Dim;
use crate::graph::view::{attr_i, is_op, node_label, GraphView};

/// How far up from a fused node's `attn_mask` the mask builder is searched (Where, And, Not,
/// Cast, … that `fuse::mask` put between the padding mask and the node).
const WALK_DEPTH: usize = 6;
/// Reshapes between the Gather and the mask it builds.
const RESHAPES: usize = 4;

/// One gathered padding mask and where it is read.
pub struct Rewire {
    /// The gathered tensor, `[1…, B at one axis, 1…, S at a later one, 1…]`.
    old: String,
    /// The bool [B, S] mask it gathers from.
    mask: String,
    /// The axes `Unsqueeze(mask, axes)` adds to give the gathered tensor's shape.
    axes: Vec<i64>,
    /// (node, input slot) pairs on fused nodes' mask paths that read `old`.
    readers: Vec<(usize, usize)>,
    /// The fused nodes whose mask it is.
    pub nodes: Vec<String>,
    pub note: String,
}

/// `t` as the gathered padding mask described above: (mask, axes to add), or None.
/// `q_batch` is the batch dim of the fused node's Q. The gather's batch range must be proven
/// equal to M's batch or to Q's: in the latter case an M whose batch differs from Q's, which the
/// exported graph reads out of bounds or in part, makes the fused node report a mask that does not
/// broadcast, instead of computing anything else.
fn gathered(v: &GraphView, t: &str, q_batch: Option<&Dim>) -> Option<(String, Vec<i64>)> {
    let out_dims = v.dims(t)?;
    let mut cur = t;
    let mut gather = None;
    for _ in 0..RESHAPES {
        let n = v.node(v.producer(cur)?);
        if is_op(n, "Reshape") {
            cur = &n.input[0];
        } else if is_op(n, "Gather") {
            gather = Some(n);
            break;
        } else {
            return None;
        }
    }
    let g = gather?;
    if attr_i(g, "axis").unwrap_or(0) != 0 {
        return None;
    }
    let (data, idx) = (g.input.first()?, g.input.get(1)?);
    // Flatten(M, axis=2) of a rank-2 M is [B·S, 1] in M's row-major order: row k is M.flat[k].
    let f = v.node(v.producer_op(data, "Flatten")?);
    let m = f.input.first()?;
    let md = v.dims(m)?;
    if md.len() != 2 || attr_i(f, "axis").unwrap_or(1) != 2 {
        return None;
    }
    if v.elem(m) != Some(DataType::Bool as i32) {
        return None;
    }
    // The Reshapes restore the index's shape: the mask at position p is M.flat[idx.flat[p]].
    if v.dims(idx)? != out_dims {
        return None;
    }
    // idx = b·S + j, either operand order.
    let add = v.node(v.producer_op(idx, "Add")?);
    let (x, y) = (add.input.first()?, add.input.get(1)?);
    let (bs, j) = if v.producer_op(x, "Mul").is_some() {
        (x, y)
    } else {
        (y, x)
    };
    let mul = v.node(v.producer_op(bs, "Mul")?);
    let (p, q) = (mul.input.first()?, mul.input.get(1)?);
    let stride_is_s = |s: &str| v.infos.ints(s) == Some(std::slice::from_ref(&md[1]));
    let b = if stride_is_s(q) {
        p
    } else if stride_is_s(p) {
        q
    } else {
        return None;
    };
    let (rb, ab, nb) = arange_axis(v, b, 8)?;
    let (rj, aj, nj) = arange_axis(v, j, 8)?;
    let r = out_dims.len();
    let batch_ok = nb == md[0] || q_batch == Some(&nb);
    if rb != r || rj != r || ab >= aj || !batch_ok || nj != md[1] {
        return None;
    }
    // Every other axis has size 1: the broadcast of b and j is exactly M with unit axes added.
    let axes: Vec<i64> = (0..r)
        .filter(|&a| a != ab && a != aj)
        .map(|a| a as i64)
        .collect();
    let unit = Dim::Val(1);
    if axes.iter().any(|&a| out_dims[a as usize] != unit)
        || out_dims[ab] != nb
        || out_dims[aj] != nj
    {
        return None;
    }
    Some((m.clone(), axes))
}

/// The gathered padding masks on the mask paths of the graph's fused nodes.
pub fn plans(v: &GraphView) -> Vec<Rewire> {
    let mut found: BTreeMap<String, Rewire> = BTreeMap::new();
    for (i, n) in v.graph.node.iter().enumerate() {
        if !is_flash(n) {
            continue;
        }
        let Some(m) = n.input.get(3).filter(|m| !m.is_empty()) else {
            continue;
        };
        let q_batch = v.dims(&n.input[0]).and_then(|d| d.first());
        let mut stack = vec![(m.clone(), i, 3usize, 0usize)];
        let mut seen = HashSet::new();
        while let Some((t, reader, slot, depth)) = stack.pop() {
            if !seen.insert((t.clone(), reader, slot)) {
                continue;
            }
            if let Some((mask, axes)) = gathered(v, &t, q_batch) {
                let e = found.entry(t.clone()).or_insert_with(|| Rewire {
                    note: format!(
                        "padding mask read from '{mask}' directly (index gather dropped)"
                    ),
                    old: t.clone(),
                    mask,
                    axes,
                    readers: Vec::new(),
                    nodes: Vec::new(),
                });
                e.readers.push((reader, slot));
                let label = node_label(n);
                if !e.nodes.contains(&label) {
                    e.nodes.push(label);
                }
                continue;
            }
            if depth >= WALK_DEPTH {
                continue;
            }
            let Some(p) = v.producer(&t) else { continue };
            let pn = v.node(p);
            let builder = [
                "Where", "And", "Or", "Not", "Cast", "Identity", "Add", "Sub",
            ];
            if builder.iter().any(|op| is_op(pn, op)) {
                for (k, inp) in pn.input.iter().enumerate().filter(|(_, s)| !s.is_empty()) {
                    stack.push((inp.clone(), p, k, depth + 1));
                }
            }
        }
    }
    found.into_values().collect()
}

/// Reads each gathered mask from `Unsqueeze(mask, axes)` instead, then drops what only the
/// gather used.
pub fn apply(g: &mut GraphProto, rewires: &[Rewire], opset: i64) {
    if rewires.is_empty() {
        return;
    }
    let mut names = Names::new(g);
    // New nodes go right before their first reader (the mask is produced before the gather).
    let mut inserts: BTreeMap<usize, Vec<NodeProto>> = BTreeMap::new();
    let mut candidates = HashSet::new();
    for r in rewires {
        let out = names.fresh(&format!("{}/unsqueezed", r.mask));
        let nm = names.fresh(&format!("{}/unsqueeze_node", r.mask));
        let mut nodes = Vec::new();
        let (inputs, attrs) = if opset >= 13 {
            let t = crate::graph::tensor::int64_tensor("", &[r.axes.len() as i64], &r.axes);
            let axes = plan::constant(&mut names, &mut nodes, &r.mask, "unsqueeze_axes", t);
            (vec![r.mask.clone(), axes], vec![])
        } else {
            (vec![r.mask.clone()], vec![plan::attr_ints("axes", &r.axes)])
        };
        nodes.push(plan::node(
            "Unsqueeze",
            nm,
            inputs,
            vec![out.clone()],
            attrs,
        ));
        let first = r.readers.iter().map(|&(n, _)| n).min().unwrap_or(0);
        inserts.entry(first).or_default().extend(nodes);
        for &(n, k) in &r.readers {
            g.node[n].input[k] = out.clone();
        }
        candidates.insert(r.old.clone());
    }
    let old = std::mem::take(&mut g.node);
    for (i, n) in old.into_iter().enumerate() {
        if let Some(new) = inserts.remove(&i) {
            g.node.extend(new);
        }
        g.node.push(n);
    }
    super::rewrite::remove_dead(g, candidates);
}
