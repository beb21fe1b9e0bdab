//! The standard ONNX `Attention` node (opset 23+): same inputs and attributes as the fused
//! operator, so it maps by a rename, unless its meaning could differ. A mask that contains the
//! causal triangle (exporters pass HF's causal ∧ padding mask with is_causal=0) becomes
//! is_causal=1 plus what remains of the mask.

use super::plan::{self, Names, Plan, Summary};
use super::reason::Skip;
use super::{causal, gqa};
use crate::graph::onnx::{tensor_proto::DataType, NodeProto};
use crate::graph::shapes::Dim;
use crate::graph::tensor;
use crate::graph::view::{attr_f, attr_i, node_label, GraphView};

/// Attributes that carry over unchanged.
const KEPT: &[&str] = &[
    "is_causal",
    "scale",
    "q_num_heads",
    "kv_num_heads",
    "softcap",
];

/// The sequence-length dim of a 4D [B, H, S, D] or 3D [B, S, H·D] tensor.
fn seq_dim(v: &GraphView, t: &str) -> Option<Dim> {
    v.dims(t).and_then(|d| match d.len() {
        4 => Some(d[2].clone()),
        3 => Some(d[1].clone()),
        _ => None,
    })
}

pub fn match_attention(v: &GraphView, i: usize, names: &mut Names) -> Result<Plan, Skip> {
    let n = v.node(i);
    let label = node_label(n);
    if let Some(qk) = n.output.get(3).filter(|s| !s.is_empty()) {
        if !v.consumers(qk).is_empty() || v.is_graph_output(qk) {
            return Err(Skip::new(
                "qk-output-used",
                label,
                format!("output '{qk}' is read"),
            ));
        }
    }
    let input = |k: usize| n.input.get(k).filter(|s| !s.is_empty()).cloned();
    let (Some(q), Some(k), Some(_)) = (input(0), input(1), input(2)) else {
        return Err(Skip::new("rank-unknown", label, "Q, K or V missing"));
    };
    let elem = v.elem(&q);
    if !elem.is_some_and(tensor::is_attention_float) {
        return Err(Skip::new(
            "dtype-unsupported",
            label,
            format!("Q type {elem:?}"),
        ));
    }
    let (sq, skv) = (seq_dim(v, &q), seq_dim(v, &k));
    let mut causal = attr_i(n, "is_causal").unwrap_or(0) != 0;
    if causal {
        // ORT 1.31 aligns a causal mask top-left, the operator bottom-right: the same only when
        // query and key lengths are provably equal and there is no past.
        if input(4).is_some() {
            return Err(Skip::new(
                "causal-alignment-ambiguous",
                label,
                "is_causal with past_key",
            ));
        }
        if sq.is_none() || sq != skv {
            return Err(Skip::new(
                "causal-alignment-ambiguous",
                label,
                format!("query length {sq:?} and key length {skv:?} are not proven equal"),
            ));
        }
    }
    let mut attrs: Vec<_> = n
        .attribute
        .iter()
        .filter(|a| a.name.as_deref().is_some_and(|s| KEPT.contains(&s)))
        .cloned()
        .collect();
    let mut inputs = n.input.clone();
    inputs.truncate(7);
    let mut new_nodes = Vec::new();
    let mut mask = match input(3) {
        None => "none".to_string(),
        Some(m) if v.elem(&m) == Some(DataType::Bool as i32) => "bool".into(),
        Some(_) => "float".into(),
    };
    if let (false, Some(m), None, Some(sq), Some(skv)) = (causal, input(3), input(4), &sq, &skv) {
        let mut add = |op: &str, ins: Vec<String>| helper(names, &mut new_nodes, &label, op, ins);
        let split = if mask == "bool" {
            causal::split_bool(v, &m, sq, skv)
                .map(|sp| (sp.window_left, causal::rebuild_bool(sp.rest, &mut add)))
        } else {
            causal::split_additive(v, &m, sq, skv)
                .map(|fs| (fs.split.window_left, causal::rebuild_float(fs, &mut add)))
        };
        if let Some((window, rest)) = split {
            causal = true;
            attrs.retain(|a| a.name.as_deref() != Some("is_causal"));
            attrs.push(plan::attr_int("is_causal", 1));
            if let Some(w) = window {
                attrs.push(plan::attr_int("window_left", w));
            }
            inputs[3] = rest.unwrap_or_default();
            mask = if inputs[3].is_empty() {
                "causal".into()
            } else {
                format!("causal + {mask}")
            };
            if let Some(w) = window {
                mask = format!("{mask}, window_left={w}");
            }
        }
    }
    // Any mask left: its smallest broadcast form (see mask.rs).
    if let Some(m) = input(3).filter(|m| inputs[3] == *m) {
        let mut add = |op: &str, ins: Vec<String>| helper(names, &mut new_nodes, &label, op, ins);
        let shrunk = if v.elem(&m) == Some(DataType::Bool as i32) {
            causal::shrink_bool(v, &m).map(|parts| causal::rebuild_bool(parts, &mut add))
        } else {
            causal::shrink_float(v, &m, &mut add).map(|(t, _)| t)
        };
        if let Some(t) = shrunk {
            inputs[3] = t.unwrap_or_default();
            if inputs[3].is_empty() {
                mask = "none".into();
            }
        }
    }
    if input(6).is_some() {
        mask = format!("{mask} + nonpad_kv_seqlen");
    }
    // 4D K and V repeated for GQA before the node: read the un-repeated heads (both or neither).
    let mut remove = vec![i];
    let mut gqa = false;
    if v.rank(&q) == Some(4) && input(4).is_none() {
        if let (Some((kb, kn)), Some((vb, vn))) = (
            gqa::fold_repeat_kv(v, &inputs[1], i),
            gqa::fold_repeat_kv(v, &inputs[2], i),
        ) {
            inputs[1] = kb;
            inputs[2] = vb;
            remove.extend(kn.into_iter().chain(vn));
            gqa = true;
        }
    }
    fill_gaps(v, &mut inputs, &attrs, names, &mut new_nodes, &label)?;
    let outputs: Vec<String> = n.output.iter().take(3).cloned().collect();
    let name = names.fresh(&format!("{label}/FlashAttention"));
    new_nodes.push(plan::flash_node(name, inputs, outputs, attrs));
    Ok(Plan {
        remove,
        anchor: i,
        new_nodes,
        summary: Summary {
            scale: attr_f(n, "scale"),
            is_causal: causal,
            softcap: attr_f(n, "softcap").filter(|c| *c != 0.0),
            mask,
            gqa_folded: gqa,
            layout: if v.rank(&q) == Some(3) {
                "BSD".into()
            } else {
                "BHSD".into()
            },
            layout_note: None,
            qkv_pack: None,
            bias_fold: None,
        },
    })
}

/// Adds a helper node for the rewritten mask and returns its output.
fn helper(
    names: &mut Names,
    nodes: &mut Vec<NodeProto>,
    site: &str,
    op: &str,
    inputs: Vec<String>,
) -> String {
    let tag = op.to_lowercase();
    let out = names.fresh(&format!("{site}/mask_{tag}"));
    let nm = names.fresh(&format!("{site}/mask_{tag}_node"));
    nodes.push(plan::node(op, nm, inputs, vec![out.clone()], vec![]));
    out
}

/// ONNX Runtime 1.20–1.23 crash loading a custom-op node that omits an optional input before one
/// it passes, so every omitted input up to the last present one gets a neutral value: an all-true
/// bool `[1]` mask, and an empty past (`[B, Hkv, 0, D]`, sliced from K/V) before
/// `nonpad_kv_seqlen`.
fn fill_gaps(
    v: &GraphView,
    inputs: &mut Vec<String>,
    attrs: &[crate::graph::onnx::AttributeProto],
    names: &mut Names,
    nodes: &mut Vec<NodeProto>,
    site: &str,
) -> Result<(), Skip> {
    while inputs.last().is_some_and(String::is_empty) {
        inputs.pop();
    }
    if inputs.len() > 4 && inputs[3].is_empty() {
        let mut t = tensor::int64_tensor("", &[1], &[]);
        t.data_type = Some(DataType::Bool as i32);
        t.int32_data = vec![1];
        inputs[3] = plan::constant(names, nodes, site, "all_true_mask", t);
    }
    if inputs.len() > 6 && inputs[4].is_empty() && inputs[5].is_empty() {
        for k in [1, 2] {
            inputs[3 + k] = empty_past(v, &inputs[k].clone(), attrs, names, nodes, site)?;
        }
    }
    if let Some(g) = inputs.iter().position(String::is_empty) {
        return Err(Skip::new(
            "optional-input-gap",
            site,
            format!("input {g} is omitted before a present one and has no neutral value"),
        ));
    }
    Ok(())
}

/// `[B, Hkv, 0, D]` from K or V (4D: a Slice of no positions; 3D [B, S, Hkv·D]: that Slice
/// reshaped by the known head count and size, then transposed).
fn empty_past(
    v: &GraphView,
    x: &str,
    attrs: &[crate::graph::onnx::AttributeProto],
    names: &mut Names,
    nodes: &mut Vec<NodeProto>,
    site: &str,
) -> Result<String, Skip> {
    let gap = |why: String| Skip::new("optional-input-gap", site, why);
    let rank = v
        .rank(x)
        .ok_or_else(|| gap(format!("rank of '{x}' unknown")))?;
    let axis = match rank {
        4 => 2,
        3 => 1,
        r => return Err(gap(format!("'{x}' has rank {r}"))),
    };
    let mut ints = |tag: &str, vals: &[i64]| {
        let t = tensor::int64_tensor("", &[vals.len() as i64], vals);
        plan::constant(names, nodes, site, tag, t)
    };
    let (zero, ax) = (ints("zero", &[0]), ints("seq_axis", &[axis]));
    let sliced = names.fresh(&format!("{site}/empty_past"));
    let nm = names.fresh(&format!("{site}/empty_past_node"));
    nodes.push(plan::node(
        "Slice",
        nm,
        vec![x.to_string(), zero.clone(), zero, ax],
        vec![sliced.clone()],
        vec![],
    ));
    if rank == 4 {
        return Ok(sliced);
    }
    let hkv = attrs
        .iter()
        .find(|a| a.name.as_deref() == Some("kv_num_heads"))
        .and_then(|a| a.i)
        .filter(|h| *h > 0);
    let last = v.dims(x).and_then(|d| d.last().cloned());
    let (Some(h), Some(Dim::Val(hd))) = (hkv, last) else {
        return Err(gap(format!("head count or size of 3D '{x}' unknown")));
    };
    if hd % h != 0 {
        return Err(gap(format!(
            "'{x}' width {hd} is not a multiple of {h} heads"
        )));
    }
    let shape = {
        let t = tensor::int64_tensor("", &[4], &[0, 0, h, hd / h]);
        plan::constant(names, nodes, site, "past_shape", t)
    };
    let split = names.fresh(&format!("{site}/empty_past_bshd"));
    let nm = names.fresh(&format!("{site}/empty_past_reshape"));
    nodes.push(plan::node(
        "Reshape",
        nm,
        vec![sliced, shape],
        vec![split.clone()],
        vec![],
    ));
    let out = names.fresh(&format!("{site}/empty_past_bhsd"));
    let nm = names.fresh(&format!("{site}/empty_past_transpose"));
    nodes.push(plan::node(
        "Transpose",
        nm,
        vec![split],
        vec![out.clone()],
        vec![plan::attr_ints("perm", &[0, 2, 1, 3])],
    ));
    Ok(out)
}
