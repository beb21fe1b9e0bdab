//! Proving that a mask contains the causal triangle (and a sliding window), as Hugging Face
//! builds it: `And(ones, kv_idx ≤ q_idx, kv_idx > q_idx − w, padding)` over `Range` indices,
//! used directly (bool) or as `Where(mask, 0, min)`. The proven parts become `is_causal` and
//! `window_left`; the other conjuncts (padding) stay as the mask.
//!
//! Rows in which every key is masked (only at padding query positions: left padding with a
//! causal mask, or right padding beyond a sliding window) are the one place where the result can
//! differ: the exported graph adds `finfo.min` everywhere and so averages all values uniformly,
//! while the operator never looks at keys outside the triangle/window. Every row with a visible
//! key is the same up to float rounding.

use crate::graph::onnx::tensor_proto::DataType;
use crate::graph::shapes::Dim;
use crate::graph::tensor;
use crate::graph::view::{attr, attr_i, attr_ints, is_op, GraphView};

/// What a mask was split into.
#[derive(Debug, Default)]
pub struct Split {
    /// A `kv ≤ q` conjunct was proven.
    pub causal: bool,
    /// From a `kv > q − w` conjunct: keys i − window_left ≤ j stay visible.
    pub window_left: Option<i64>,
    /// Bool tensors whose conjunction is the rest of the mask.
    pub rest: Vec<String>,
}

/// A float mask split: the proven parts, and what the rest of the mask is made of.
#[derive(Debug)]
pub struct FloatSplit {
    pub split: Split,
    /// `Where(cond, keep, fill)`: what unmasked positions add (0, or T5's position bias), and
    /// the fill; reused to rebuild the rest of `cond`.
    pub keep: String,
    pub keep_is_zero: bool,
    pub fill: String,
    /// Other summands of the mask (a position bias added to the causal mask, as T5 does).
    pub others: Vec<String>,
}

/// An additive mask `Where(cond, keep, fill)` (keep = 0, or a bias), or a sum with one such term,
/// whose `cond` contains the causal triangle. Masked positions get `fill` here and `keep + fill`
/// or nothing after the rewrite: all are ≤ −10⁴ below the row's visible scores, so exp() is 0.
pub fn split_additive(v: &GraphView, m: &str, sq: &Dim, skv: &Dim) -> Option<FloatSplit> {
    let mut summands = Vec::new();
    sum_terms(v, m, &mut summands, 3);
    for (k, t) in summands.iter().enumerate() {
        let Some(w) = v.producer_op(t, "Where").map(|p| v.node(p)) else {
            continue;
        };
        let (Some(cond), Some(keep), Some(fill)) =
            (w.input.first(), w.input.get(1), w.input.get(2))
        else {
            continue;
        };
        if !is_const_fill(v, fill, |x| x <= super::decomposed::MASK_FILL_MAX, 6) {
            continue;
        }
        let keep_is_zero = is_const_fill(v, keep, |x| x == 0.0, 6);
        if let Some(split) = split_bool(v, cond, sq, skv) {
            let others = summands
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != k)
                .map(|(_, s)| s.clone())
                .collect();
            return Some(FloatSplit {
                split,
                keep: keep.clone(),
                keep_is_zero,
                fill: fill.clone(),
                others,
            });
        }
    }
    None
}

fn sum_terms(v: &GraphView, t: &str, out: &mut Vec<String>, depth: usize) {
    match v.producer_op(t, "Add").filter(|_| depth > 0) {
        Some(p) => {
            for i in &v.node(p).input {
                sum_terms(v, i, out, depth - 1);
            }
        }
        None => out.push(t.to_string()),
    }
}

/// Rebuilds what remains of a float mask, `Σ others + Where(∧ rest, keep, fill)`, with `add`
/// making each new node (op, inputs) → output. None when nothing remains.
pub fn rebuild_float(
    fs: FloatSplit,
    add: &mut dyn FnMut(&str, Vec<String>) -> String,
) -> Option<String> {
    let mut terms = fs.others;
    match rebuild_bool(fs.split.rest, add) {
        Some(cond) => terms.push(add("Where", vec![cond, fs.keep, fs.fill])),
        None if !fs.keep_is_zero => terms.push(fs.keep),
        None => {}
    }
    let mut it = terms.into_iter();
    let first = it.next()?;
    Some(it.fold(first, |acc, t| add("Add", vec![acc, t])))
}

/// `∧ rest`, None when empty.
pub fn rebuild_bool(
    rest: Vec<String>,
    add: &mut dyn FnMut(&str, Vec<String>) -> String,
) -> Option<String> {
    let mut it = rest.into_iter();
    let first = it.next()?;
    Some(it.fold(first, |acc, t| add("And", vec![acc, t])))
}

/// A boolean mask (true = attend) that is a conjunction containing the causal triangle.
pub fn split_bool(v: &GraphView, cond: &str, sq: &Dim, skv: &Dim) -> Option<Split> {
    // Bottom-right and top-left alignment agree only when the lengths are equal.
    if sq != skv {
        return None;
    }
    let mut parts = Vec::new();
    conjuncts(v, cond, &mut parts, 8);
    let mut split = Split::default();
    for p in parts {
        if is_always_true(v, &p) {
            continue;
        }
        if !split.causal && (is_causal_compare(v, &p, sq, skv) || is_lower_trilu(v, &p, sq, skv)) {
            split.causal = true;
        } else if let Some(w) =
            window_compare(v, &p, sq, skv).filter(|_| split.window_left.is_none())
        {
            split.window_left = Some(w);
        } else {
            split.rest.push(p);
        }
    }
    // A window alone (no proven causal triangle) is left as a mask.
    if !split.causal {
        return None;
    }
    Some(split)
}

/// Flattens And(…) trees (through bool Casts, Identity and Expand, which only broadcast).
fn conjuncts(v: &GraphView, t: &str, out: &mut Vec<String>, depth: usize) {
    let Some(p) = v.producer(t).filter(|_| depth > 0) else {
        out.push(t.to_string());
        return;
    };
    let n = v.node(p);
    let bool_cast = is_op(n, "Cast")
        && attr_i(n, "to") == Some(DataType::Bool as i64)
        && v.elem(&n.input[0]) == Some(DataType::Bool as i32);
    if is_op(n, "And") {
        for i in &n.input {
            conjuncts(v, i, out, depth - 1);
        }
    } else if bool_cast
        || is_op(n, "Identity")
        || (is_op(n, "Expand") && v.rank(&n.input[0]).is_some_and(|r| r <= 4))
    {
        conjuncts(v, &n.input[0], out, depth - 1);
    } else {
        out.push(t.to_string());
    }
}

/// A constant (through Identity/Cast/Expand) whose every element satisfies `ok`.
fn is_const_fill(v: &GraphView, t: &str, ok: impl Fn(f64) -> bool + Copy, depth: usize) -> bool {
    if let Some(c) = v.constant(t) {
        return tensor::numbers(c)
            .is_some_and(|vals| !vals.is_empty() && vals.iter().all(|&x| ok(x)));
    }
    let Some(p) = v.producer(t).filter(|_| depth > 0) else {
        return false;
    };
    let n = v.node(p);
    if is_op(n, "ConstantOfShape") {
        let value = attr(n, "value")
            .and_then(|a| a.t.as_ref())
            .and_then(tensor::numbers);
        return ok(value.and_then(|v| v.first().copied()).unwrap_or(0.0));
    }
    if is_op(n, "Identity") || is_op(n, "Cast") || is_op(n, "Expand") {
        return is_const_fill(v, &n.input[0], ok, depth - 1);
    }
    false
}

fn is_all_true(v: &GraphView, t: &str) -> bool {
    is_const_fill(v, t, |x| x != 0.0, 4)
}

/// A conjunct that is true everywhere: an all-true constant, or an index compared with a bound
/// it always meets (`arange ≥ c` or `c ≤ arange` with a constant c ≤ 0, as Hugging Face's
/// bidirectional masks write `q_idx ≥ 0`).
pub fn is_always_true(v: &GraphView, t: &str) -> bool {
    if is_all_true(v, t) {
        return true;
    }
    let Some(n) = v.producer(t).map(|p| v.node(p)) else {
        return false;
    };
    let (idx, bound) = if is_op(n, "GreaterOrEqual") {
        (n.input.first(), n.input.get(1))
    } else if is_op(n, "LessOrEqual") {
        (n.input.get(1), n.input.first())
    } else {
        return false;
    };
    let (Some(idx), Some(bound)) = (idx, bound) else {
        return false;
    };
    arange_axis(v, idx, 8).is_some() && is_const_fill(v, bound, |x| x <= 0.0, 4)
}

/// A boolean mask in its smallest broadcast form: its conjuncts with the always-true ones
/// dropped and the broadcasting nodes (Expand, and the And with a larger all-true tensor) looked
/// through. `Some(vec![])` when the mask is true everywhere; None when nothing can be dropped.
/// The conjunction of the parts broadcasts to the same values as `cond`.
pub fn shrink_bool(v: &GraphView, cond: &str) -> Option<Vec<String>> {
    let mut parts = Vec::new();
    conjuncts(v, cond, &mut parts, 8);
    let all = parts.len();
    parts.retain(|p| !is_always_true(v, p));
    let via_and = v.producer_op(cond, "And").is_some();
    if (parts.len() == 1 && parts[0] == cond) || (via_and && parts.len() == all) {
        return None;
    }
    Some(parts)
}

/// A float mask `Where(cond, keep, fill)` with single-element `keep` and `fill`, rebuilt over the
/// smallest form of `cond` (same keep and fill, so the same values and dtype, −inf or the
/// dtype's min alike). `Some(None)` when it adds zero everywhere; None when it cannot shrink.
pub fn shrink_float(
    v: &GraphView,
    m: &str,
    add: &mut dyn FnMut(&str, Vec<String>) -> String,
) -> Option<(Option<String>, Vec<String>)> {
    let w = v.node(v.producer_op(m, "Where")?);
    let (cond, keep, fill) = (w.input.first()?, w.input.get(1)?, w.input.get(2)?);
    let single = |t: &str| v.infos.get(t).is_some_and(|i| i.is_single());
    if !single(keep) || !single(fill) {
        return None;
    }
    let parts = shrink_bool(v, cond)?;
    let checked = parts.clone();
    match rebuild_bool(parts, add) {
        Some(c) => Some((
            Some(add("Where", vec![c, keep.clone(), fill.clone()])),
            checked,
        )),
        None if is_const_fill(v, keep, |x| x == 0.0, 6) => Some((None, checked)),
        None => None,
    }
}

/// `Range(0, n, 1)` moved by Unsqueezes (and int Casts): (rank, axis, n).
pub(super) fn arange_axis(v: &GraphView, t: &str, depth: usize) -> Option<(usize, usize, Dim)> {
    let n = v.node(v.producer(t)?);
    if depth == 0 {
        return None;
    }
    if is_op(n, "Cast")
        && v.elem(&n.output[0])
            .is_some_and(|e| !tensor::is_float(e) && e != DataType::Bool as i32)
    {
        return arange_axis(v, &n.input[0], depth - 1);
    }
    // `arange + 0` (a cache position offset of zero) and Slices that keep every dim.
    if is_op(n, "Add") {
        let zero = |k: usize| {
            n.input.get(k).is_some_and(|z| {
                v.infos.ints(z) == Some(&[Dim::Val(0)][..]) && v.is_constant_expr(z, 6)
            })
        };
        if zero(1) {
            return arange_axis(v, &n.input[0], depth - 1);
        }
        if zero(0) {
            return arange_axis(v, n.input.get(1)?, depth - 1);
        }
        return None;
    }
    if is_op(n, "Slice") || is_op(n, "Identity") {
        let (a, b) = (v.dims(&n.input[0])?, v.dims(&n.output[0])?);
        return (a == b)
            .then(|| arange_axis(v, &n.input[0], depth - 1))
            .flatten();
    }
    if is_op(n, "Range") {
        let scalar = |k: usize| {
            v.infos
                .ints(n.input.get(k)?)
                .and_then(|d| (d.len() == 1).then(|| d[0].clone()))
        };
        if scalar(0)? != Dim::Val(0) || scalar(2)? != Dim::Val(1) {
            return None;
        }
        return Some((1, 0, scalar(1)?));
    }
    if is_op(n, "Unsqueeze") {
        let axes = attr_ints(n, "axes").filter(|a| !a.is_empty()).or_else(|| {
            v.infos
                .ints(n.input.get(1)?)
                .and_then(|d| d.iter().map(Dim::val).collect())
        })?;
        let (r, mut pos, lim) = arange_axis(v, &n.input[0], depth - 1)?;
        let new_rank = r + axes.len();
        let mut ax: Vec<usize> = axes
            .iter()
            .map(|&a| usize::try_from(if a < 0 { a + new_rank as i64 } else { a }).ok())
            .collect::<Option<_>>()?;
        ax.sort_unstable();
        for a in ax {
            if a <= pos {
                pos += 1;
            }
        }
        return Some((new_rank, pos, lim));
    }
    None
}

/// Key index along the last axis over Skv, and query index along the one before over Sq.
fn kv_and_q(v: &GraphView, kv: &str, q: &str, sq: &Dim, skv: &Dim) -> bool {
    match (arange_axis(v, kv, 8), arange_axis(v, q, 8)) {
        (Some((rk, ak, lk)), Some((rq, aq, lq))) => {
            rk <= 4 && rq <= 4 && ak + 1 == rk && aq + 2 == rq && lk == *skv && lq == *sq
        }
        _ => false,
    }
}

/// `kv ≤ q` (or `q ≥ kv`).
fn is_causal_compare(v: &GraphView, t: &str, sq: &Dim, skv: &Dim) -> bool {
    let Some(p) = v.producer(t) else { return false };
    let n = v.node(p);
    let (a, b) = (&n.input[0], n.input.get(1).cloned().unwrap_or_default());
    (is_op(n, "LessOrEqual") && kv_and_q(v, a, &b, sq, skv))
        || (is_op(n, "GreaterOrEqual") && kv_and_q(v, &b, a, sq, skv))
}

/// `Trilu(ones[.., Sq, Skv], upper=0)` (bool, or through a bool Cast), or `Not` of the strict
/// upper triangle `Trilu(ones, upper=1, k=1)`: true on and below the diagonal.
fn is_lower_trilu(v: &GraphView, t: &str, sq: &Dim, skv: &Dim) -> bool {
    let Some(p) = v.producer(t) else { return false };
    let n = v.node(p);
    if is_op(n, "Cast") && attr_i(n, "to") == Some(DataType::Bool as i64) {
        return is_lower_trilu(v, &n.input[0], sq, skv);
    }
    let (trilu, want_upper, want_k) = if is_op(n, "Not") {
        match v.producer_op(&n.input[0], "Trilu") {
            Some(tp) => (tp, 1, 1),
            None => return false,
        }
    } else if is_op(n, "Trilu") {
        (p, 0, 0)
    } else {
        return false;
    };
    let tn = v.node(trilu);
    let k = match tn.input.get(1).filter(|s| !s.is_empty()) {
        None => 0,
        Some(k) => match v.infos.ints(k) {
            Some([Dim::Val(k)]) if v.is_constant_expr(&tn.input[1], 4) => *k,
            _ => return false,
        },
    };
    let square = v
        .dims(&tn.input[0])
        .is_some_and(|d| d.len() >= 2 && d[d.len() - 2] == *sq && d[d.len() - 1] == *skv);
    attr_i(tn, "upper").unwrap_or(1) == want_upper
        && k == want_k
        && square
        && is_all_true(v, &tn.input[0])
}

/// `kv > q − w` (or `q − w < kv`): returns window_left = w − 1.
fn window_compare(v: &GraphView, t: &str, sq: &Dim, skv: &Dim) -> Option<i64> {
    let n = v.node(v.producer(t)?);
    let (kv, shifted) = if is_op(n, "Greater") {
        (n.input[0].clone(), n.input.get(1)?.clone())
    } else if is_op(n, "Less") {
        (n.input.get(1)?.clone(), n.input[0].clone())
    } else {
        return None;
    };
    let s = v.node(v.producer_op(&shifted, "Sub")?);
    let w = match v.infos.ints(s.input.get(1)?)? {
        [Dim::Val(w)] if *w >= 1 && v.is_constant_expr(&s.input[1], 4) => *w,
        _ => return None,
    };
    kv_and_q(v, &kv, &s.input[0], sq, skv).then_some(w - 1)
}
