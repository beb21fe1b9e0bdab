//! Masks found on a score path, turned into the fused node's inputs: a proven causal triangle
//! becomes `is_causal=1`; everything else is combined into one `attn_mask` (bool when it is a
//! single selecting mask, float otherwise) and checked to broadcast to [B, Hq, Sq, Skv].

use super::causal;
use super::decomposed::MASK_FILL_MAX;
use super::plan::{self, Names};
use super::reason::Skip;
use crate::graph::onnx::{tensor_proto::DataType, AttributeProto, NodeProto, TensorProto};
use crate::graph::shapes::Dim;
use crate::graph::tensor;
use crate::graph::view::{attr_i, is_op, GraphView};

/// One mask operation on the score path, in the order met walking up from the Softmax.
#[derive(Clone, Debug)]
pub enum MaskTerm {
    /// `scores + m` (padding mask, causal bias, relative-position or ALiBi bias).
    Additive(String),
    /// `Where(cond, scores, fill)` (`keep_when_true`) or `Where(cond, fill, scores)`.
    Select {
        cond: String,
        keep_when_true: bool,
        fill: String,
    },
}

/// The fused node's mask inputs and the nodes that build them.
pub struct BuiltMask {
    pub tensor: Option<String>,
    pub is_causal: bool,
    /// From a proven sliding window.
    pub window_left: Option<i64>,
    pub nodes: Vec<NodeProto>,
    pub description: String,
}

/// Combines `terms` (see the module comment). `qd`/`kd` are Q's and K's [B, H, S, D] dims.
#[allow(clippy::too_many_arguments)]
pub fn build(
    v: &GraphView,
    terms: &[MaskTerm],
    qd: &[Dim],
    kd: &[Dim],
    score_dims: Option<&[Dim]>,
    elem: Option<i32>,
    names: &mut Names,
    site: &str,
) -> Result<BuiltMask, Skip> {
    let mut is_causal = false;
    let mut window_left = None;
    let mut rest = Vec::new();
    let mut nodes = Vec::new();
    // Masks rebuilt from proven-broadcastable parts; not in the inferred shapes, so not rechecked.
    let mut prechecked: Vec<String> = Vec::new();
    let (sq, skv) = (&qd[2], &kd[2]);
    for t in terms {
        if causal_term(v, t, qd, kd) {
            is_causal = true;
            continue;
        }
        // (window, parts to check, how to rebuild the rest)
        let split = match t {
            MaskTerm::Additive(m) => causal::split_additive(v, m, sq, skv).map(|fs| {
                let parts: Vec<String> = fs
                    .split
                    .rest
                    .iter()
                    .chain(fs.others.iter())
                    .cloned()
                    .collect();
                (fs.split.window_left, parts, Err(fs))
            }),
            MaskTerm::Select {
                cond,
                keep_when_true: true,
                fill,
            } => causal::split_bool(v, cond, sq, skv)
                .map(|sp| (sp.window_left, sp.rest.clone(), Ok((sp.rest, fill.clone())))),
            _ => None,
        };
        let Some((window, parts, rebuild)) = split else {
            rest.push(t.clone());
            continue;
        };
        for r in &parts {
            check_broadcast(v, r, score_dims, site)?;
        }
        is_causal = true;
        window_left = window_left.or(window);
        let mut add =
            |op: &str, inputs: Vec<String>| push(names, &mut nodes, site, op, inputs, vec![]);
        let term = match rebuild {
            Err(fs) => causal::rebuild_float(fs, &mut add).map(MaskTerm::Additive),
            Ok((conds, fill)) => {
                causal::rebuild_bool(conds, &mut add).map(|cond| MaskTerm::Select {
                    cond,
                    keep_when_true: true,
                    fill,
                })
            }
        };
        let Some(term) = term else { continue };
        prechecked.push(match &term {
            MaskTerm::Additive(m) => m.clone(),
            MaskTerm::Select { cond, .. } => cond.clone(),
        });
        rest.push(term);
    }
    for t in &rest {
        let name = match t {
            MaskTerm::Additive(m) => m,
            MaskTerm::Select { cond, .. } => cond,
        };
        if prechecked.contains(name) {
            continue;
        }
        check_broadcast(v, name, score_dims, site)?;
        if let MaskTerm::Additive(m) = t {
            if let (Some(me), Some(qe)) = (v.elem(m), elem) {
                if me != qe {
                    return Err(Skip::new(
                        "mask-dtype-mismatch",
                        site,
                        format!("mask '{m}' has type {me}, Q has {qe}"),
                    ));
                }
            }
        }
    }
    // The smallest broadcast form of each remaining mask: a Hugging Face mask is the padding
    // vector [B, 1, 1, Skv] and'ed with all-true index comparisons and expanded to
    // [B, 1, Sq, Skv]; passing the vector keeps memory linear in S.
    let mut small = Vec::with_capacity(rest.len());
    for t in rest {
        let shrunk = match &t {
            MaskTerm::Additive(m) if !prechecked.contains(m) => {
                let mut add = |op: &str, inputs: Vec<String>| {
                    push(names, &mut nodes, site, op, inputs, vec![])
                };
                causal::shrink_float(v, m, &mut add)
                    .map(|(m, parts)| (m.map(MaskTerm::Additive), parts))
            }
            MaskTerm::Select {
                cond,
                keep_when_true,
                fill,
            } if !prechecked.contains(cond) => causal::shrink_bool(v, cond)
                // All true and selecting masked positions: leave it (it masks everything).
                .filter(|parts| *keep_when_true || !parts.is_empty())
                .map(|parts| {
                    let mut add = |op: &str, inputs: Vec<String>| {
                        push(names, &mut nodes, site, op, inputs, vec![])
                    };
                    let term = causal::rebuild_bool(parts.clone(), &mut add).map(|cond| {
                        MaskTerm::Select {
                            cond,
                            keep_when_true: *keep_when_true,
                            fill: fill.clone(),
                        }
                    });
                    (term, parts)
                }),
            _ => None,
        };
        match shrunk {
            None => small.push(t),
            Some((term, parts)) => {
                for p in &parts {
                    check_broadcast(v, p, score_dims, site)?;
                }
                if let Some(term) = term {
                    prechecked.push(match &term {
                        MaskTerm::Additive(m) => m.clone(),
                        MaskTerm::Select { cond, .. } => cond.clone(),
                    });
                    small.push(term);
                }
            }
        }
    }
    let rest = small;
    let additive: Vec<&String> = rest
        .iter()
        .filter_map(|t| {
            if let MaskTerm::Additive(m) = t {
                Some(m)
            } else {
                None
            }
        })
        .collect();
    let selects: Vec<(&String, bool, &String)> = rest
        .iter()
        .filter_map(|t| {
            if let MaskTerm::Select {
                cond,
                keep_when_true,
                fill,
            } = t
            {
                Some((cond, *keep_when_true, fill))
            } else {
                None
            }
        })
        .collect();
    let (tensor, description) = if additive.is_empty() && selects.is_empty() {
        (None, "none".to_string())
    } else if additive.is_empty() && selects.len() == 1 {
        let (cond, keep, _) = selects[0];
        let mut c = cond.clone();
        if v.elem(&c) != Some(DataType::Bool as i32) && !prechecked.contains(&c) {
            c = push(
                names,
                &mut nodes,
                site,
                "Cast",
                vec![c],
                vec![plan::attr_int("to", DataType::Bool as i64)],
            );
        }
        if !keep {
            c = push(names, &mut nodes, site, "Not", vec![c], vec![]);
        }
        (Some(c), "bool".to_string())
    } else {
        let mut sum: Option<String> = None;
        for m in &additive {
            sum = Some(match sum {
                None => (*m).clone(),
                Some(s) => push(
                    names,
                    &mut nodes,
                    site,
                    "Add",
                    vec![s, (*m).clone()],
                    vec![],
                ),
            });
        }
        for (cond, keep, fill) in &selects {
            let base = match &sum {
                Some(s) => s.clone(),
                // Where(cond, 0, fill): a zero of the fill's type, made by scaling the fill.
                None => push(
                    names,
                    &mut nodes,
                    site,
                    "Sub",
                    vec![(*fill).clone(), (*fill).clone()],
                    vec![],
                ),
            };
            let mut c = (*cond).clone();
            if v.elem(&c) != Some(DataType::Bool as i32) && !prechecked.contains(&c) {
                c = push(
                    names,
                    &mut nodes,
                    site,
                    "Cast",
                    vec![c],
                    vec![plan::attr_int("to", DataType::Bool as i64)],
                );
            }
            let inputs = if *keep {
                vec![c, base, (*fill).clone()]
            } else {
                vec![c, (*fill).clone(), base]
            };
            sum = Some(push(names, &mut nodes, site, "Where", inputs, vec![]));
        }
        let d = if selects.is_empty() && additive.len() == 1 {
            "float"
        } else {
            "float (combined)"
        };
        (sum, d.to_string())
    };
    let description = if is_causal {
        if tensor.is_some() {
            format!("causal + {description}")
        } else {
            "causal".into()
        }
    } else {
        description
    };
    let description = match window_left {
        Some(w) => format!("{description}, window_left={w}"),
        None => description,
    };
    Ok(BuiltMask {
        tensor,
        is_causal,
        window_left,
        nodes,
        description,
    })
}

/// Adds a helper node `op(inputs)` and returns its output name.
fn push(
    names: &mut Names,
    nodes: &mut Vec<NodeProto>,
    site: &str,
    op: &str,
    inputs: Vec<String>,
    attrs: Vec<AttributeProto>,
) -> String {
    let tag = op.to_lowercase();
    let out = names.fresh(&format!("{site}/mask_{tag}"));
    let nm = names.fresh(&format!("{site}/mask_{tag}_node"));
    nodes.push(plan::node(op, nm, inputs, vec![out.clone()], attrs));
    out
}

/// The mask must broadcast to the scores' shape without adding dims.
fn check_broadcast(
    v: &GraphView,
    m: &str,
    score_dims: Option<&[Dim]>,
    site: &str,
) -> Result<(), Skip> {
    let Some(md) = v.dims(m) else {
        return Err(Skip::new(
            "mask-not-broadcastable",
            site,
            format!("rank of mask '{m}' unknown"),
        ));
    };
    if md.len() > 4 {
        return Err(Skip::new(
            "mask-not-broadcastable",
            site,
            format!("mask '{m}' has rank {}", md.len()),
        ));
    }
    if let Some(sd) = score_dims {
        for (a, b) in md.iter().rev().zip(sd.iter().rev()) {
            if let (Dim::Val(x), Dim::Val(y)) = (a, b) {
                if *x != 1 && x != y {
                    return Err(Skip::new(
                        "mask-not-broadcastable",
                        site,
                        format!("mask '{m}' dims {md:?} vs scores {sd:?}"),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Whether a mask term is exactly the bottom-right aligned causal triangle for these Q/K.
fn causal_term(v: &GraphView, t: &MaskTerm, qd: &[Dim], kd: &[Dim]) -> bool {
    let (sq, skv) = (&qd[2], &kd[2]);
    match t {
        MaskTerm::Select {
            cond,
            keep_when_true,
            ..
        } => {
            let Some(tri) = triangle_of(v, cond, sq, skv) else {
                return false;
            };
            // keep where j ≤ i; with the negated spelling, drop where j > i.
            (*keep_when_true && tri == Tri::LowerKeep)
                || (!*keep_when_true && tri == Tri::UpperDrop)
        }
        MaskTerm::Additive(m) => {
            let Some(t) = v.constant(m) else { return false };
            let Some(vals) = tensor::floats(t) else {
                return false;
            };
            let d = &t.dims;
            if d.len() < 2 || d[..d.len() - 2].iter().any(|&x| x != 1) {
                return false;
            }
            let (r, c) = (d[d.len() - 2], d[d.len() - 1]);
            r == c && *sq == Dim::Val(r) && *skv == Dim::Val(c) && {
                let c = c as usize;
                vals.iter().enumerate().all(|(k, &x)| {
                    if k % c <= k / c {
                        x == 0.0
                    } else {
                        x <= MASK_FILL_MAX
                    }
                })
            }
        }
    }
}

#[derive(PartialEq, Debug)]
enum Tri {
    /// true on and below the diagonal.
    LowerKeep,
    /// true strictly above the diagonal.
    UpperDrop,
}

/// A boolean [.., S, S] mask that is a causal triangle for Sq = Skv = S: a constant, a Cast of
/// one, or a Slice [0:S, 0:S] of a larger constant triangle (GPT-2's `bias` buffer).
fn triangle_of(v: &GraphView, cond: &str, sq: &Dim, skv: &Dim) -> Option<Tri> {
    if sq != skv {
        return None;
    }
    if let Some(t) = v.constant(cond) {
        return const_triangle(t, Some(sq));
    }
    let p = v.producer(cond)?;
    let n = v.node(p);
    if is_op(n, "Cast") && attr_i(n, "to") == Some(DataType::Bool as i64) {
        return triangle_of(v, &n.input[0], sq, skv);
    }
    if is_op(n, "Slice") {
        return sliced_triangle(v, cond, sq);
    }
    None
}

/// A chain of Slices over a constant triangle buffer that keeps rows 0..S and columns 0..S.
fn sliced_triangle(v: &GraphView, t: &str, s: &Dim) -> Option<Tri> {
    let mut cur = t.to_string();
    let mut sliced = [false; 2];
    for _ in 0..4 {
        if let Some(buf) = v.constant(&cur) {
            let tri = const_triangle(buf, None)?;
            let r = buf.dims.len();
            // An axis not sliced must already have length S.
            for (k, done) in sliced.iter().enumerate() {
                if !done && Dim::Val(buf.dims[r - 2 + k]) != *s {
                    return None;
                }
            }
            return Some(tri);
        }
        let p = v.producer_op(&cur, "Slice")?;
        let n = v.node(p);
        let r = v.rank(&n.input[0])? as i64;
        let starts = v.infos.ints(n.input.get(1)?)?;
        let ends = v.infos.ints(n.input.get(2)?)?;
        let axes: Vec<i64> = match n.input.get(3).filter(|a| !a.is_empty()) {
            Some(a) => v
                .infos
                .ints(a)?
                .iter()
                .map(Dim::val)
                .collect::<Option<_>>()?,
            None => (0..starts.len() as i64).collect(),
        };
        if let Some(steps) = n.input.get(4).filter(|s| !s.is_empty()) {
            if v.infos.ints(steps)?.iter().any(|s| *s != Dim::Val(1)) {
                return None;
            }
        }
        for (k, &a) in axes.iter().enumerate() {
            let a = if a < 0 { a + r } else { a };
            if a < r - 2 || starts.get(k) != Some(&Dim::Val(0)) || ends.get(k) != Some(s) {
                return None;
            }
            let slot = (a - (r - 2)) as usize;
            if sliced[slot] {
                return None;
            }
            sliced[slot] = true;
        }
        cur = n.input[0].clone();
    }
    None
}

/// A constant [1.., N, N] tensor that is a triangle (as bool/int values). `size` must match N
/// when given.
fn const_triangle(t: &TensorProto, size: Option<&Dim>) -> Option<Tri> {
    let d = &t.dims;
    if d.len() < 2 || d[..d.len() - 2].iter().any(|&x| x != 1) {
        return None;
    }
    let (r, c) = (d[d.len() - 2], d[d.len() - 1]);
    if r != c || size.is_some_and(|s| *s != Dim::Val(r)) {
        return None;
    }
    let vals = tensor::ints(t)?;
    let c = c as usize;
    let lower = vals
        .iter()
        .enumerate()
        .all(|(k, &x)| (x != 0) == (k % c <= k / c));
    let upper = vals
        .iter()
        .enumerate()
        .all(|(k, &x)| (x != 0) == (k % c > k / c));
    if lower {
        Some(Tri::LowerKeep)
    } else if upper {
        Some(Tri::UpperDrop)
    } else {
        None
    }
}
