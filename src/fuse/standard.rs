//! The standard ONNX `Attention` node (opset 23+): same inputs and attributes as the fused
//! operator, so it maps by a rename, unless its meaning could differ.

use super::plan::{self, Names, Plan, Summary};
use super::reason::Skip;
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
    let (Some(q), Some(k), Some(_v)) = (input(0), input(1), input(2)) else {
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
    let causal = attr_i(n, "is_causal").unwrap_or(0) != 0;
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
        let seq = |t: &str| {
            v.dims(t).and_then(|d| match d.len() {
                4 => Some(d[2].clone()),
                3 => Some(d[1].clone()),
                _ => None,
            })
        };
        match (seq(&q), seq(&k)) {
            (Some(a), Some(b)) if a == b => {}
            (a, b) => {
                return Err(Skip::new(
                    "causal-alignment-ambiguous",
                    label,
                    format!("query length {a:?} and key length {b:?} are not proven equal"),
                ))
            }
        }
    }
    let attrs = n
        .attribute
        .iter()
        .filter(|a| a.name.as_deref().is_some_and(|s| KEPT.contains(&s)))
        .cloned()
        .collect();
    let mut inputs = n.input.clone();
    inputs.truncate(7);
    let outputs: Vec<String> = n.output.iter().take(3).cloned().collect();
    let name = names.fresh(&format!("{label}/FlashAttention"));
    let node = plan::flash_node(name, inputs, outputs, attrs);
    let mask = match input(3) {
        None => "none".to_string(),
        Some(m) if v.elem(&m) == Some(crate::graph::onnx::tensor_proto::DataType::Bool as i32) => {
            "bool".into()
        }
        Some(_) => "float".into(),
    };
    Ok(Plan {
        remove: vec![i],
        anchor: i,
        new_nodes: vec![node],
        summary: Summary {
            scale: attr_f(n, "scale"),
            is_causal: causal,
            softcap: attr_f(n, "softcap").filter(|c| *c != 0.0),
            mask: if input(6).is_some() {
                format!("{mask} + nonpad_kv_seqlen")
            } else {
                mask
            },
            gqa_folded: false,
            layout: if v.rank(&q) == Some(3) {
                "BSD".into()
            } else {
                "BHSD".into()
            },
        },
    })
}
