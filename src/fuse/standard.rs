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
