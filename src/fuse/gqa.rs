//! GQA: a K or V whose heads were repeated for grouped-query attention
//! (`Unsqueeze(2) → Expand → Reshape`, repeat_interleave order) is read un-repeated by the
//! operator, which maps query head h to KV head h / (Hq / Hkv) — the same order. Tile-style
//! repeats are not this pattern and stay as they are (still correct, just not folded).

use super::decomposed::shape_only;
use crate::graph::shapes::Dim;
use crate::graph::view::{attr_ints, is_op, GraphView};

/// `Reshape(Expand(Unsqueeze(x, 2), [B, Hkv, n, S, D]), [B, Hkv·n, S, D])` — repeat_interleave of
/// KV heads, possibly with Identity (a clone) or no-op Slices between the steps, as the dynamo
/// exporter writes it. Returns x and the nodes when every dim is proven.
pub fn fold_repeat_kv(v: &GraphView, t: &str, reader: usize) -> Option<(String, Vec<usize>)> {
    let mut nodes = Vec::new();
    // Each step's output must be read only by the next step.
    let private = |name: &str, rd: usize| {
        v.consumers(name)
            .iter()
            .all(|&c| c == rd || shape_only(v, c))
            && !v.is_graph_output(name)
    };
    if !private(t, reader) {
        return None;
    }
    let r = v.producer_op(t, "Reshape")?;
    nodes.push(r);
    let mut cur = v.node(r).input[0].clone();
    let mut rd = r;
    // Skips Identity and Slices that keep every dim, returning the producer of the first other op.
    let skip = |cur: &mut String, rd: &mut usize, nodes: &mut Vec<usize>| -> Option<usize> {
        loop {
            if !private(cur, *rd) {
                return None;
            }
            let p = v.producer(cur)?;
            let n = v.node(p);
            let no_op = is_op(n, "Identity")
                || (is_op(n, "Slice") && {
                    let (a, b) = (v.dims(&n.input[0])?, v.dims(cur)?);
                    a == b
                });
            if !no_op {
                return Some(p);
            }
            nodes.push(p);
            *rd = p;
            *cur = n.input[0].clone();
        }
    };
    let e = skip(&mut cur, &mut rd, &mut nodes).filter(|&e| is_op(v.node(e), "Expand"))?;
    nodes.push(e);
    let target = v.infos.ints(&v.node(e).input[1]);
    cur = v.node(e).input[0].clone();
    rd = e;
    let u = skip(&mut cur, &mut rd, &mut nodes).filter(|&u| is_op(v.node(u), "Unsqueeze"))?;
    nodes.push(u);
    let un = v.node(u);
    let axes = attr_ints(un, "axes")
        .filter(|a| !a.is_empty())
        .or_else(|| {
            un.input
                .get(1)
                .and_then(|a| v.infos.ints(a))
                .and_then(|d| d.iter().map(Dim::val).collect())
        })?;
    let x = un.input[0].clone();
    let xd = v.dims(&x)?;
    if axes != [2] || xd.len() != 4 {
        return None;
    }
    let (target, out) = (target?, v.dims(t)?);
    let same = |a: &Dim, b: &Dim| a == b || *a == Dim::Val(1);
    let ok = target.len() == 5
        && same(&target[0], &xd[0])
        && same(&target[1], &xd[1])
        && same(&target[3], &xd[2])
        && same(&target[4], &xd[3])
        && out.len() == 4
        && out[0] == xd[0]
        && out[2] == xd[2]
        && out[3] == xd[3]
        && match (&out[1], &xd[1], &target[2]) {
            (Dim::Val(h), Dim::Val(hk), Dim::Val(n)) => hk.checked_mul(*n) == Some(*h),
            _ => false,
        };
    ok.then_some((x, nodes))
}
