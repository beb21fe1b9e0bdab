//! After fusing: hand fused nodes the `[B, S, H·D]` projections instead of their head-split
//! copies. Exporters split heads as `Reshape([B, S, H, D]) → Transpose[0, 2, 1, 3]` and merge
//! them back as `Transpose[0, 2, 1, 3] → Reshape([B, S, H·Dv])`; the operator's 3D layout is
//! exactly that, so a fused node whose Q, K, V and Y all take that form reads the projections
//! directly, and four transposes (with their shape computations) per layer go.
//!
//! Only when every step is proven: the permutations, the reshape shapes (batch and sequence
//! dims equal, last dim = heads × head size), and no other reader of any intermediate tensor.
//! Nodes with past/present (KV cache) keep the 4D form.

use super::plan::{attr_int, Plan, Summary, DOMAIN, OP_TYPE};
use crate::graph::onnx::NodeProto;
use crate::graph::view::{attr_ints, is_op, node_label, GraphView};

const SWAP_HEADS: [i64; 4] = [0, 2, 1, 3];

/// A proven head split `t = Transpose[0,2,1,3](Reshape(x, [B, S, H, D]))`.
struct HeadSplit {
    x: String,
    heads: i64,
    head_size: i64,
    /// The Transpose and the Reshape, removed once nothing else reads them.
    nodes: [usize; 2],
}

/// One fused node turned to the 3D layout.
pub struct Folded {
    pub plan: Plan,
    /// The fused node's name and the labels of the nodes folded into it, for the report.
    pub node: String,
    pub folded: Vec<String>,
}

fn only_reader(v: &GraphView, t: &str, reader: usize) -> bool {
    !v.is_graph_output(t) && v.consumers(t) == [reader]
}

fn head_split(v: &GraphView, t: &str, reader: usize) -> Option<HeadSplit> {
    if !only_reader(v, t, reader) {
        return None;
    }
    let ti = v.producer_op(t, "Transpose")?;
    if attr_ints(v.node(ti), "perm")? != SWAP_HEADS {
        return None;
    }
    let split = v.node(ti).input.first()?;
    if !only_reader(v, split, ti) {
        return None;
    }
    let ri = v.producer_op(split, "Reshape")?;
    let x = v.node(ri).input.first()?;
    let (xd, sd) = (v.dims(x)?, v.dims(split)?);
    if xd.len() != 3 || sd.len() != 4 || xd[0] != sd[0] || xd[1] != sd[1] {
        return None;
    }
    let (heads, head_size) = (sd[2].val()?, sd[3].val()?);
    if heads <= 0 || head_size <= 0 || xd[2].val()? != heads * head_size {
        return None;
    }
    Some(HeadSplit {
        x: x.clone(),
        heads,
        head_size,
        nodes: [ti, ri],
    })
}

/// `y` read only by Transpose[0,2,1,3], read only by a Reshape to `[B, S, heads·dv]` with B and
/// S those of `q_x`: returns (transpose, reshape).
fn head_merge(v: &GraphView, y: &str, q_x: &str, heads: i64, dv: i64) -> Option<(usize, usize)> {
    if v.is_graph_output(y) {
        return None;
    }
    let &[ti] = v.consumers(y) else { return None };
    let t = v.node(ti);
    if !is_op(t, "Transpose") || attr_ints(t, "perm")? != SWAP_HEADS {
        return None;
    }
    let merged = t.output.first()?;
    if v.is_graph_output(merged) {
        return None;
    }
    let &[ri] = v.consumers(merged) else {
        return None;
    };
    let r = v.node(ri);
    if !is_op(r, "Reshape") || r.input.first() != Some(merged) {
        return None;
    }
    let (od, qd) = (v.dims(r.output.first()?)?, v.dims(q_x)?);
    if od.len() != 3 || qd.len() != 3 || od[0] != qd[0] || od[1] != qd[1] {
        return None;
    }
    (od[2].val()? == heads * dv).then_some((ti, ri))
}

fn is_flash(n: &NodeProto) -> bool {
    n.domain.as_deref() == Some(DOMAIN) && n.op_type.as_deref() == Some(OP_TYPE)
}

fn fold(v: &GraphView, i: usize) -> Option<Folded> {
    let n = v.node(i);
    let present = |k: usize| n.input.get(k).is_some_and(|s| !s.is_empty());
    if present(4) || present(5) || n.output.iter().skip(1).any(|s| !s.is_empty()) {
        return None;
    }
    if n.input.len() < 3 || n.output.is_empty() {
        return None;
    }
    let q = head_split(v, &n.input[0], i)?;
    let k = head_split(v, &n.input[1], i)?;
    let val = head_split(v, &n.input[2], i)?;
    if k.heads != val.heads || q.head_size != k.head_size || q.heads % k.heads != 0 {
        return None;
    }
    let declared = |name: &str| {
        n.attribute
            .iter()
            .find(|a| a.name.as_deref() == Some(name))
            .and_then(|a| a.i)
    };
    if declared("q_num_heads").is_some_and(|h| h != q.heads)
        || declared("kv_num_heads").is_some_and(|h| h != k.heads)
    {
        return None;
    }
    let (merge_t, merge_r) = head_merge(v, &n.output[0], &q.x, q.heads, val.head_size)?;

    let mut node = n.clone();
    node.input[0] = q.x.clone();
    node.input[1] = k.x.clone();
    node.input[2] = val.x.clone();
    node.output[0] = v.node(merge_r).output[0].clone();
    node.attribute
        .retain(|a| !matches!(a.name.as_deref(), Some("q_num_heads" | "kv_num_heads")));
    node.attribute.push(attr_int("q_num_heads", q.heads));
    node.attribute.push(attr_int("kv_num_heads", k.heads));

    let mut remove = vec![i, merge_t];
    remove.extend(q.nodes.iter().chain(&k.nodes).chain(&val.nodes).copied());
    remove.sort_unstable();
    remove.dedup();
    let folded = remove
        .iter()
        .chain(std::iter::once(&merge_r))
        .filter(|&&r| r != i)
        .map(|&r| node_label(v.node(r)))
        .collect();
    Some(Folded {
        node: node.name.clone().unwrap_or_default(),
        plan: Plan {
            remove,
            anchor: merge_r,
            new_nodes: vec![node],
            summary: Summary::default(),
        },
        folded,
    })
}

/// Every fused node of the graph that can take the 3D layout, as plans for `rewrite::apply`
/// (each anchored at the head-merging Reshape, whose output the node now produces).
pub fn plans(v: &GraphView) -> Vec<Folded> {
    (0..v.graph.node.len())
        .filter(|&i| is_flash(v.node(i)))
        .filter_map(|i| fold(v, i))
        .collect()
}
