//! After fusing: hand fused nodes the `[B, S, H·D]` projections instead of their head-split
//! copies. Exporters split heads as `Reshape([B, S, H, D]) → Transpose[0, 2, 1, 3]` and merge
//! them back as `Transpose[0, 2, 1, 3] → Reshape([B, S, H·Dv])`; the operator's 3D layout is
//! exactly that, so a fused node whose Q, K, V and Y all take that form reads the projections
//! directly, and four transposes (with their shape computations) per layer go.
//!
//! Only when every step is proven: the permutations and the reshape shapes (batch and sequence
//! dims equal, last dim = heads × head size). A head split that something else also reads stays
//! for that reader (the fused node reads the same values from the projection); the head merge
//! must be the fused output's only use, apart from shape computations that exist only for the
//! merge Reshape's target (GPT-2's TorchScript export takes it from `Shape` of the merged heads),
//! since the 4D output is no longer produced. A merge Reshape that flattens further (to
//! `[B·S, H·Dv]`, GPT-2's dynamo export) stays, reading the 3D output. Nodes with past/present
//! (KV cache) keep the 4D form. A node that keeps it gets the reason in the report.

use super::plan::{attr_int, is_flash, Names, Plan, Summary};
use crate::graph::onnx::NodeProto;
use crate::graph::view::{attr_i, attr_ints, is_op, node_label, GraphView};

const SWAP_HEADS: [i64; 4] = [0, 2, 1, 3];
/// How far the shape computations between a merged tensor and its Reshape are followed.
const SHAPE_CHAIN_DEPTH: usize = 8;

/// A proven head split `t = Transpose[0,2,1,3](Reshape(x, [B, S, H, D]))`.
struct HeadSplit {
    x: String,
    heads: i64,
    head_size: i64,
    /// The Transpose and the Reshape when only this split reads them: removed with it.
    dropped: Vec<usize>,
    /// Those that something else also reads: kept for it.
    kept: Vec<usize>,
}

/// One fused node turned to the 3D layout.
pub struct Folded {
    pub plan: Plan,
    /// The fused node's name and the labels of the nodes folded into it, for the report.
    pub node: String,
    pub folded: Vec<String>,
    /// Head-split nodes that stay because other nodes read them too.
    pub kept: Vec<String>,
}

/// A fused node left in the 4D layout, and why.
pub struct Unfolded {
    pub node: String,
    pub reason: String,
}

fn only_reader(v: &GraphView, t: &str, reader: usize) -> bool {
    !v.is_graph_output(t) && v.consumers(t) == [reader]
}

/// What produces `t`, for messages.
fn producer_of(v: &GraphView, t: &str) -> String {
    v.producer(t).map_or_else(
        || "a graph input or initializer".into(),
        |p| {
            let n = v.node(p);
            format!("{} {}", n.op_type.as_deref().unwrap_or("?"), node_label(n))
        },
    )
}

/// (heads, head size) when `split` is `x` `[B, S, H·D]` reshaped to `[B, S, H, D]`.
fn split_dims(v: &GraphView, x: &str, split: &str) -> Option<(i64, i64)> {
    let (xd, sd) = (v.dims(x)?, v.dims(split)?);
    if xd.len() != 3 || sd.len() != 4 || xd[0] != sd[0] || xd[1] != sd[1] {
        return None;
    }
    let (heads, head_size) = (sd[2].val()?, sd[3].val()?);
    (heads > 0 && head_size > 0 && xd[2].val()? == heads * head_size).then_some((heads, head_size))
}

/// `t`, read by fused node `reader` as its input `what`, as a head split.
fn head_split(v: &GraphView, what: &str, t: &str, reader: usize) -> Result<HeadSplit, String> {
    let not_split = |why: String| {
        format!("{what} is not a Reshape → Transpose[0,2,1,3] head split of a [B, S, H·D] tensor: {why}")
    };
    let ti = v
        .producer_op(t, "Transpose")
        .ok_or_else(|| not_split(format!("it comes from {}", producer_of(v, t))))?;
    if attr_ints(v.node(ti), "perm").as_deref() != Some(&SWAP_HEADS[..]) {
        return Err(not_split(format!(
            "{} has another perm",
            node_label(v.node(ti))
        )));
    }
    let split = v.node(ti).input.first().map_or("", String::as_str);
    let ri = v.producer_op(split, "Reshape").ok_or_else(|| {
        not_split(format!(
            "the transposed tensor comes from {}",
            producer_of(v, split)
        ))
    })?;
    let x = v.node(ri).input.first().map_or("", String::as_str);
    let (heads, head_size) = split_dims(v, x, split).ok_or_else(|| {
        not_split(format!(
            "the shapes of {x} and {split} do not prove [B, S, H·D] → [B, S, H, D]"
        ))
    })?;
    // Split nodes that other nodes also read stay for them: the values are the same either way.
    let (dropped, kept) = match (only_reader(v, t, reader), only_reader(v, split, ti)) {
        (true, true) => (vec![ti, ri], vec![]),
        (true, false) => (vec![ti], vec![ri]),
        (false, _) => (vec![], vec![ti, ri]),
    };
    Ok(HeadSplit {
        x: x.to_string(),
        heads,
        head_size,
        dropped,
        kept,
    })
}

/// Whether every reader of `t`, followed through their outputs, ends at one of `ends`: removing
/// those then leaves all of them dead (the rewrite's dead-code pass takes them away).
fn ends_at(v: &GraphView, t: &str, ends: &[usize], depth: usize) -> bool {
    !v.is_graph_output(t)
        && v.consumers(t).iter().all(|&c| {
            let outs = &v.node(c).output;
            ends.contains(&c)
                || (depth < SHAPE_CHAIN_DEPTH
                    && outs.iter().any(|o| !o.is_empty())
                    && outs
                        .iter()
                        .filter(|o| !o.is_empty())
                        .all(|o| ends_at(v, o, ends, depth + 1)))
        })
}

/// How a fused node's output is merged back from heads.
struct Merge {
    transpose: usize,
    reshape: usize,
    /// The Reshape flattens more than the heads (GPT-2's dynamo export merges to
    /// `[B·S, H·Dv]`): it stays, reading the 3D output, whose elements are in the same order.
    keeps_reshape: bool,
}

/// Whether the merge Reshape's output is `[B, S, heads·dv]` with B and S those of `q_x`.
fn merges_to_bsd(v: &GraphView, out: &str, q_x: &str, hidden: i64) -> bool {
    match (v.dims(out), v.dims(q_x)) {
        (Some(od), Some(qd)) if od.len() == 3 && qd.len() == 3 => {
            od[0] == qd[0] && od[1] == qd[1] && od[2].val() == Some(hidden)
        }
        _ => false,
    }
}

/// Whether Reshape `r` gives the same result from `[B, S, H·Dv]` as from `[B, S, H, Dv]`: both
/// hold the same elements in the same order, so only a 0 ("copy this input dim") at a position
/// past S tells them apart. The target must be known.
fn same_from_3d(v: &GraphView, r: usize) -> bool {
    let n = v.node(r);
    let allowzero = attr_i(n, "allowzero").unwrap_or(0) != 0;
    let target = n.input.get(1).and_then(|t| v.infos.ints(t));
    target.is_some_and(|t| allowzero || t.iter().skip(2).all(|d| d.val() != Some(0)))
}

/// `y` merged back by Transpose[0,2,1,3] → Reshape, with nothing else needing `y` or the merged
/// heads once the fused node writes the 3D output instead.
fn head_merge(v: &GraphView, y: &str, q_x: &str, hidden: i64) -> Result<Merge, String> {
    let not_merge =
        |why: &str| format!("Y is not merged back by Transpose[0,2,1,3] → Reshape: {why}");
    let swaps = |c: &usize| {
        let t = v.node(*c);
        is_op(t, "Transpose") && attr_ints(t, "perm").as_deref() == Some(&SWAP_HEADS[..])
    };
    let ti = *v
        .consumers(y)
        .iter()
        .find(|c| swaps(c))
        .ok_or_else(|| not_merge("no Transpose[0,2,1,3] reads it"))?;
    let merged = v.node(ti).output.first().map_or("", String::as_str);
    let ri = *v
        .consumers(merged)
        .iter()
        .find(|&&c| {
            is_op(v.node(c), "Reshape")
                && v.node(c).input.first().map(String::as_str) == Some(merged)
        })
        .ok_or_else(|| not_merge("no Reshape reads the transposed heads"))?;
    let out = v.node(ri).output.first().map_or("", String::as_str);
    let merge = |keeps_reshape| Merge {
        transpose: ti,
        reshape: ri,
        keeps_reshape,
    };
    if merges_to_bsd(v, out, q_x, hidden) {
        // The Reshape goes too, and with it what computes its target (maybe from the heads).
        if ends_at(v, y, &[ti, ri], 0) && ends_at(v, merged, &[ri], 0) {
            return Ok(merge(false));
        }
    } else if only_reader(v, y, ti) && only_reader(v, merged, ri) && same_from_3d(v, ri) {
        return Ok(merge(true));
    }
    Err(not_merge(&format!(
        "{out} is not proven to be [B, S, {hidden}], or the 4D output or the merged heads are \
         also read elsewhere (or are graph outputs)"
    )))
}

/// The attribute `name` the node already declares, if any.
fn declared(n: &NodeProto, name: &str) -> Option<i64> {
    n.attribute
        .iter()
        .find(|a| a.name.as_deref() == Some(name))
        .and_then(|a| a.i)
}

/// The three head splits of fused node `i`, checked against each other and the node.
fn head_splits(v: &GraphView, i: usize) -> Result<[HeadSplit; 3], String> {
    let n = v.node(i);
    let q = head_split(v, "Q", &n.input[0], i)?;
    let k = head_split(v, "K", &n.input[1], i)?;
    let val = head_split(v, "V", &n.input[2], i)?;
    if k.heads != val.heads || q.head_size != k.head_size || q.heads % k.heads != 0 {
        return Err(format!(
            "the head splits do not fit together: Q {}×{}, K {}×{}, V {}×{}",
            q.heads, q.head_size, k.heads, k.head_size, val.heads, val.head_size
        ));
    }
    if declared(n, "q_num_heads").is_some_and(|h| h != q.heads)
        || declared(n, "kv_num_heads").is_some_and(|h| h != k.heads)
    {
        return Err("the node's declared head counts differ from its head splits".into());
    }
    Ok([q, k, val])
}

/// The fused node on the projections, writing the merged output itself, or through the merge
/// Reshape when that one stays.
fn rewritten(
    n: &NodeProto,
    splits: [&HeadSplit; 3],
    merge_r: &NodeProto,
    keeps_reshape: bool,
    names: &mut Names,
) -> Vec<NodeProto> {
    let mut node = n.clone();
    for (input, s) in node.input.iter_mut().zip(splits) {
        *input = s.x.clone();
    }
    node.attribute
        .retain(|a| !matches!(a.name.as_deref(), Some("q_num_heads" | "kv_num_heads")));
    node.attribute
        .push(attr_int("q_num_heads", splits[0].heads));
    node.attribute
        .push(attr_int("kv_num_heads", splits[1].heads));
    if !keeps_reshape {
        node.output[0] = merge_r.output[0].clone();
        return vec![node];
    }
    let y3 = names.fresh(&format!("{}/bsd", merge_r.output[0]));
    let mut reshape = merge_r.clone();
    reshape.input[0] = y3.clone();
    node.output[0] = y3;
    vec![node, reshape]
}

fn fold(v: &GraphView, i: usize, names: &mut Names) -> Result<Folded, String> {
    let n = v.node(i);
    let present = |k: usize| n.input.get(k).is_some_and(|s| !s.is_empty());
    if present(4) || present(5) || n.output.iter().skip(1).any(|s| !s.is_empty()) {
        return Err("past/present (KV cache) tensors are 4D: the node keeps that layout".into());
    }
    if n.input.len() < 3 || n.output.is_empty() {
        return Err("the node lacks Q, K, V or Y".into());
    }
    let [q, k, val] = head_splits(v, i)?;
    let merge = head_merge(v, &n.output[0], &q.x, q.heads * val.head_size)?;
    let splits = [&q, &k, &val];
    let new_nodes = rewritten(n, splits, v.node(merge.reshape), merge.keeps_reshape, names);

    let mut remove = vec![i, merge.transpose];
    remove.extend(splits.iter().flat_map(|s| s.dropped.iter().copied()));
    remove.sort_unstable();
    remove.dedup();
    let mut kept: Vec<usize> = splits.iter().flat_map(|s| s.kept.iter().copied()).collect();
    kept.sort_unstable();
    kept.dedup();
    let label = |r: &usize| node_label(v.node(*r));
    let merge_reshape = (!merge.keeps_reshape).then_some(&merge.reshape);
    let folded = remove
        .iter()
        .chain(merge_reshape)
        .filter(|&&r| r != i)
        .map(label)
        .collect();
    Ok(Folded {
        node: n.name.clone().unwrap_or_default(),
        kept: kept.iter().map(label).collect(),
        plan: Plan {
            remove,
            anchor: merge.reshape,
            new_nodes,
            summary: Summary::default(),
        },
        folded,
    })
}

/// Every fused node of the graph: those that can take the 3D layout, as plans for
/// `rewrite::apply` (each anchored at the head-merging Reshape, whose output the node now
/// produces), and the others with the reason they keep the 4D one.
pub fn plans(v: &GraphView) -> (Vec<Folded>, Vec<Unfolded>) {
    let mut names = Names::new(v.graph);
    let mut folded = Vec::new();
    let mut unfolded = Vec::new();
    for i in (0..v.graph.node.len()).filter(|&i| is_flash(v.node(i))) {
        match fold(v, i, &mut names) {
            Ok(f) => folded.push(f),
            Err(reason) => unfolded.push(Unfolded {
                node: v.node(i).name.clone().unwrap_or_default(),
                reason,
            }),
        }
    }
    (folded, unfolded)
}
