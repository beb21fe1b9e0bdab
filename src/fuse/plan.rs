//! What a matched site turns into: nodes to drop, nodes to add before the site's last node, and
//! the facts the report shows.

use serde::Serialize;

use crate::graph::onnx::{attribute_proto::AttributeType, AttributeProto, NodeProto};

/// The domain and op type of the fused operator.
pub const DOMAIN: &str = "com.flash";
pub const OP_TYPE: &str = "FlashAttention";

/// Whether `n` is a fused `com.flash.FlashAttention` node.
pub fn is_flash(n: &crate::graph::onnx::NodeProto) -> bool {
    n.domain.as_deref() == Some(DOMAIN) && n.op_type.as_deref() == Some(OP_TYPE)
}

/// A complete, checked rewrite of one site. Applied entirely or not at all.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Nodes of the site, removed by the rewrite (indices into the graph's node list).
    pub remove: Vec<usize>,
    /// The new nodes go where this node was (the site's last node, whose output they produce).
    pub anchor: usize,
    pub new_nodes: Vec<NodeProto>,
    pub summary: Summary,
}

/// What the fused node does, for the report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub scale: Option<f32>,
    pub is_causal: bool,
    pub softcap: Option<f32>,
    /// "none", "bool", "float" or a short description of the combination passed as attn_mask.
    pub mask: String,
    /// K/V heads read un-repeated (a GQA `Unsqueeze → Expand → Reshape` folded away).
    pub gqa_folded: bool,
    pub layout: String,
    /// Why a BHSD node kept that layout, or which head-split nodes a BSD one left for their
    /// other readers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layout_note: Option<String>,
    /// Whether the Q, K and V projections were packed into one MatMul (fuse::pack_qkv); absent
    /// when packing was off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qkv_pack: Option<QkvPack>,
    /// The K/V bias Adds removed by fuse::bias_fold, and where V's bias went.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bias_fold: Option<String>,
}

/// The outcome of packing one fused site's projections.
#[derive(Clone, Debug, Serialize)]
pub struct QkvPack {
    pub packed: bool,
    /// Why not (a code of `fuse::pack_qkv::CODES`), when not packed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// What replaced what, or the sentence behind `reason`.
    pub note: String,
}

/// Makes tensor and node names that do not clash with the graph's.
pub struct Names {
    taken: std::collections::HashSet<String>,
}

impl Names {
    pub fn new(graph: &crate::graph::onnx::GraphProto) -> Self {
        let mut taken = std::collections::HashSet::new();
        for n in &graph.node {
            taken.extend(n.output.iter().cloned());
            taken.extend(n.input.iter().cloned());
            taken.extend(n.name.iter().cloned());
        }
        taken.extend(graph.initializer.iter().filter_map(|t| t.name.clone()));
        taken.extend(graph.input.iter().filter_map(|t| t.name.clone()));
        Names { taken }
    }

    /// `base` itself if free, else `base_1`, `base_2`, …
    pub fn fresh(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut k = 0;
        while self.taken.contains(&name) {
            k += 1;
            name = format!("{base}_{k}");
        }
        self.taken.insert(name.clone());
        name
    }
}

pub fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

pub fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(v),
        ..Default::default()
    }
}

pub fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}

/// A node of the default domain.
pub fn node(
    op: &str,
    name: String,
    inputs: Vec<String>,
    outputs: Vec<String>,
    attrs: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(name),
        input: inputs,
        output: outputs,
        attribute: attrs,
        ..Default::default()
    }
}

/// The fused node. Trailing unused optional inputs are dropped.
pub fn flash_node(
    name: String,
    mut inputs: Vec<String>,
    outputs: Vec<String>,
    attrs: Vec<AttributeProto>,
) -> NodeProto {
    while inputs.last().is_some_and(String::is_empty) {
        inputs.pop();
    }
    let mut n = node(OP_TYPE, name, inputs, outputs, attrs);
    n.domain = Some(DOMAIN.into());
    n
}

/// A Constant node holding `t` (renamed `{site}/{tag}`, made unique); returns its output.
pub fn constant(
    names: &mut Names,
    nodes: &mut Vec<NodeProto>,
    site: &str,
    tag: &str,
    mut t: crate::graph::onnx::TensorProto,
) -> String {
    let out = names.fresh(&format!("{site}/{tag}"));
    t.name = Some(out.clone());
    let value = AttributeProto {
        name: Some("value".into()),
        r#type: Some(AttributeType::Tensor as i32),
        t: Some(t),
        ..Default::default()
    };
    let nm = names.fresh(&format!("{site}/{tag}_node"));
    nodes.push(node("Constant", nm, vec![], vec![out.clone()], vec![value]));
    out
}

/// Unsqueeze/Squeeze at axis 0 in the spelling the opset wants (an `axes` input from 13, an
/// attribute before), sharing one constant per site.
pub struct Axes {
    input: Option<String>,
}

impl Axes {
    pub fn new(opset: i64, names: &mut Names, site: &str, nodes: &mut Vec<NodeProto>) -> Self {
        if opset < 13 {
            return Axes { input: None };
        }
        let t = crate::graph::tensor::int64_tensor("", &[1], &[0]);
        Axes {
            input: Some(constant(names, nodes, site, "axis0", t)),
        }
    }

    /// `op(x, axes=[0])` into a new tensor; returns its name.
    pub fn apply(
        &mut self,
        op: &str,
        x: &str,
        names: &mut Names,
        nodes: &mut Vec<NodeProto>,
    ) -> String {
        let out = names.fresh(&format!("{x}/{}", op.to_lowercase()));
        self.apply_to(op, x, &out, names, nodes);
        out
    }

    /// `op(x, axes=[0])` into `out`.
    pub fn apply_to(
        &mut self,
        op: &str,
        x: &str,
        out: &str,
        names: &mut Names,
        nodes: &mut Vec<NodeProto>,
    ) {
        let nm = names.fresh(&format!("{out}/{}_node", op.to_lowercase()));
        let (inputs, attrs) = match &self.input {
            Some(a) => (vec![x.to_string(), a.clone()], vec![]),
            None => (vec![x.to_string()], vec![attr_ints("axes", &[0])]),
        };
        nodes.push(node(op, nm, inputs, vec![out.to_string()], attrs));
    }
}
