//! After fusing, before packing: the K and V bias `Add`s that a fused node makes redundant,
//! removed by algebra that holds for every input, so a layer runs one bias pass (Q's) where it
//! ran three.
//!
//! - **K bias.** `q·(k_j + b_k) = q·k_j + q·b_k`: the second term is the same for every key of a
//!   query, and softmax ignores a per-row constant. The Add goes; the scores differ by a constant
//!   per row, the probabilities not at all (up to rounding). Not with softcap (tanh is not
//!   shift-invariant), nor when K also leaves the node (`present_key`) or meets cached keys
//!   (`past_key`, which carry the bias).
//! - **V bias.** `Σ_j p_j (v_j + b_v) = Σ_j p_j v_j + b_v` when the row's probabilities sum to
//!   one, and through the output projection `(y + b_v)·W_o + b_o = y·W_o + (b_v·W_o + b_o)`: the
//!   Add goes and the output projection's bias becomes `b_o + b_v·W_o`, computed here in f64. Only
//!   where every row sums to one: no bool mask, `nonpad_kv_seqlen`, causal or window (a row with
//!   no visible key returns zeros, which the folded bias would shift), no `present_value` or
//!   `past_value`, and only when the node's output feeds exactly one MatMul whose bias is a
//!   constant `Add` or the bias input of ORT's `SkipLayerNormalization` /
//!   `SkipSimplifiedLayerNormalization`.
//!
//! Both need the 3D layout (the Add's output is the node's K or V input itself, the node's output
//! the MatMul's input): there the channel order is the operator's own (head-major), so no
//! reshape can move a bias element onto another key or channel.

use std::collections::HashSet;

use super::plan::{is_flash, Names};
use crate::graph::onnx::{tensor_proto::DataType, GraphProto, NodeProto, TensorProto};
use crate::graph::tensor::floats;
use crate::graph::view::{attr_f, attr_i, is_op, node_label, GraphView};

/// One fused node's folds, applied by [`apply`].
pub struct Fold {
    pub node: String,
    /// What was removed and changed, for the report.
    pub note: String,
    /// Bias Adds to remove: (Add node, the tensor its readers read instead).
    drops: Vec<(usize, String)>,
    /// The output projection's new bias: (node, input index, tensor).
    new_bias: Option<(usize, usize, TensorProto)>,
}

fn input(n: &NodeProto, k: usize) -> Option<&str> {
    n.input.get(k).map(String::as_str).filter(|s| !s.is_empty())
}

fn output(n: &NodeProto, k: usize) -> Option<&str> {
    n.output
        .get(k)
        .map(String::as_str)
        .filter(|s| !s.is_empty())
}

fn only_reader(v: &GraphView, t: &str, reader: usize) -> bool {
    !v.is_graph_output(t) && v.consumers(t) == [reader]
}

/// A constant tensor, directly or through an `Identity` (TorchScript shares equal parameters
/// that way).
fn constant<'g>(v: &GraphView<'g>, name: &str) -> Option<&'g TensorProto> {
    v.constant(name).or_else(|| {
        let id = v.producer_op(name, "Identity")?;
        v.constant(v.node(id).input.first()?)
    })
}

/// `t = Add(MatMul output, constant rank-1 bias)`, read only by `reader`: the Add, what the
/// MatMul wrote, and the bias.
fn bias_add<'g>(
    v: &GraphView<'g>,
    t: &str,
    reader: usize,
) -> Option<(usize, &'g str, &'g TensorProto)> {
    let a = v.producer_op(t, "Add")?;
    let n = v.node(a);
    if n.input.len() != 2 || !only_reader(v, t, reader) {
        return None;
    }
    let (mm_out, b) = [(0, 1), (1, 0)].into_iter().find_map(|(x, y)| {
        let mm_out = n.input[x].as_str();
        v.producer_op(mm_out, "MatMul")?;
        Some((mm_out, constant(v, &n.input[y])?))
    })?;
    (b.dims.len() == 1 && only_reader(v, mm_out, a)).then_some((a, mm_out, b))
}

/// Where the output projection's bias sits: (node, input index, the bias), for the MatMul
/// output `mm_out`.
fn projection_bias<'g>(v: &GraphView<'g>, mm_out: &str) -> Option<(usize, usize, &'g TensorProto)> {
    let &[r] = v.consumers(mm_out) else {
        return None;
    };
    if v.is_graph_output(mm_out) {
        return None;
    }
    let n = v.node(r);
    let ms = n.domain.as_deref() == Some("com.microsoft");
    let k = if is_op(n, "Add") && n.input.len() == 2 {
        usize::from(n.input[0] == mm_out)
    } else if ms && n.op_type.as_deref() == Some("SkipLayerNormalization") {
        4
    } else if ms && n.op_type.as_deref() == Some("SkipSimplifiedLayerNormalization") {
        3
    } else {
        return None;
    };
    let name = input(n, k)?;
    // The bias must be read by this node alone only if we edited it in place; a new tensor is
    // made instead, so sharing is fine.
    Some((r, k, constant(v, name)?))
}

/// `values` as a tensor named `name` of element type `dt` (float, float16 or bfloat16).
fn tensor_of(name: String, dims: Vec<i64>, dt: i32, values: &[f64]) -> Option<TensorProto> {
    let raw: Vec<u8> = match DataType::try_from(dt).ok()? {
        DataType::Float => values
            .iter()
            .flat_map(|&x| (x as f32).to_le_bytes())
            .collect(),
        DataType::Float16 => values
            .iter()
            .flat_map(|&x| half::f16::from_f64(x).to_le_bytes())
            .collect(),
        DataType::Bfloat16 => values
            .iter()
            .flat_map(|&x| half::bf16::from_f64(x).to_le_bytes())
            .collect(),
        _ => return None,
    };
    Some(TensorProto {
        name: Some(name),
        dims,
        data_type: Some(dt),
        raw_data: Some(raw.into()),
        ..Default::default()
    })
}

/// A V-bias fold: the Add to drop (and what its readers read instead), the output
/// projection's new bias (node, input index, tensor), and the report's note.
struct VFold {
    drop: (usize, String),
    bias: (usize, usize, TensorProto),
    note: String,
}

/// The V-bias fold of fused node `i`, or why there is none.
fn fold_v(v: &GraphView, i: usize, names: &mut Names) -> Result<VFold, &'static str> {
    let n = v.node(i);
    if attr_i(n, "is_causal").unwrap_or(0) != 0
        || attr_i(n, "window_left").unwrap_or(-1) >= 0
        || attr_i(n, "window_right").unwrap_or(-1) >= 0
    {
        return Err("causal or windowed rows may see no key");
    }
    if input(n, 5).is_some() || output(n, 2).is_some() {
        return Err("past_value/present_value carry the bias");
    }
    if input(n, 6).is_some() {
        return Err("nonpad_kv_seqlen may leave rows without keys");
    }
    if let Some(m) = input(n, 3) {
        if v.elem(m) != Some(DataType::Float as i32)
            && v.elem(m) != Some(DataType::Float16 as i32)
            && v.elem(m) != Some(DataType::Bfloat16 as i32)
        {
            return Err("a bool (or untyped) mask may leave rows without keys");
        }
    }
    let (hq, hkv) = match (attr_i(n, "q_num_heads"), attr_i(n, "kv_num_heads")) {
        (Some(q), Some(k)) if q > 0 && k > 0 && q % k == 0 => (q as usize, k as usize),
        _ => return Err("not the 3D layout"),
    };
    let val = input(n, 2).ok_or("no V")?;
    let (add, mm_out, bv) = bias_add(v, val, i).ok_or("V is not a MatMul + constant bias")?;
    let y = output(n, 0).ok_or("no output")?;
    let &[o] = v.consumers(y) else {
        return Err("the output has several readers");
    };
    let on = v.node(o);
    if v.is_graph_output(y) || !is_op(on, "MatMul") || input(on, 0) != Some(y) {
        return Err("the output does not feed one MatMul");
    }
    let wo = input(on, 1)
        .and_then(|w| constant(v, w))
        .filter(|w| w.dims.len() == 2)
        .ok_or("the output projection's weight is not a rank-2 constant")?;
    let (bn, bk, bo) = output(on, 0)
        .and_then(|t| projection_bias(v, t))
        .ok_or("the output projection has no constant bias to take the fold")?;
    let (rows, cols) = (wo.dims[0] as usize, wo.dims[1] as usize);
    let bv_vals = floats(bv).ok_or("V's bias is not readable here")?;
    let dv = bv_vals.len() / hkv;
    if dv * hkv != bv_vals.len() || rows != hq * dv || bo.dims[..] != [cols as i64] {
        return Err("bias and weight shapes do not line up");
    }
    let w = floats(wo).ok_or("the output projection's weight is not readable here")?;
    let mut b = floats(bo).ok_or("the output projection's bias is not readable here")?;
    // Output channel (h, d) carries V's bias of KV head h / group.
    let group = hq / hkv;
    for (r, row) in w.chunks_exact(cols).enumerate() {
        let (h, d) = (r / dv, r % dv);
        let add = bv_vals[(h / group) * dv + d];
        if add != 0.0 {
            for (bj, wj) in b.iter_mut().zip(row) {
                *bj += add * wj;
            }
        }
    }
    let base = bo.name.clone().unwrap_or_else(|| "bias".into());
    let name = names.fresh(&format!("{base}_vbias_folded"));
    let t = tensor_of(name.clone(), bo.dims.clone(), bo.data_type.unwrap_or(0), &b)
        .ok_or("the output projection's bias type is not float, float16 or bfloat16")?;
    let note = format!(
        "V bias {} folded into {} (now {name})",
        node_label(v.node(add)),
        node_label(v.node(bn))
    );
    Ok(VFold {
        drop: (add, mm_out.to_string()),
        bias: (bn, bk, t),
        note,
    })
}

/// Every fused node's folds (nodes with nothing to fold are left out).
pub fn plans(v: &GraphView) -> Vec<Fold> {
    let mut names = Names::new(v.graph);
    let mut out = Vec::new();
    let mut taken = HashSet::new();
    for i in (0..v.graph.node.len()).filter(|&i| is_flash(v.node(i))) {
        let n = v.node(i);
        let mut fold = Fold {
            node: n.name.clone().unwrap_or_default(),
            note: String::new(),
            drops: Vec::new(),
            new_bias: None,
        };
        let mut notes = Vec::new();
        let softcap = attr_f(n, "softcap").unwrap_or(0.0) != 0.0;
        let three_d = attr_i(n, "q_num_heads").is_some();
        if three_d && !softcap && input(n, 4).is_none() && output(n, 1).is_none() {
            if let Some((a, mm_out, _)) = input(n, 1).and_then(|k| bias_add(v, k, i)) {
                if taken.insert(a) {
                    notes.push(format!(
                        "K bias {} dropped (a per-query constant in the scores)",
                        node_label(v.node(a))
                    ));
                    fold.drops.push((a, mm_out.to_string()));
                }
            }
        }
        if let Ok(vf) = fold_v(v, i, &mut names) {
            if !taken.contains(&vf.drop.0) && !taken.contains(&vf.bias.0) {
                taken.insert(vf.drop.0);
                taken.insert(vf.bias.0);
                notes.push(vf.note);
                fold.drops.push(vf.drop);
                fold.new_bias = Some(vf.bias);
            }
        }
        if !notes.is_empty() {
            fold.note = notes.join("; ");
            out.push(fold);
        }
    }
    out
}

/// Applies the folds: readers of each dropped Add read the MatMul output, the Adds go, new
/// biases replace the old inputs, and initializers nothing reads any more are dropped.
pub fn apply(g: &mut GraphProto, folds: Vec<Fold>) {
    if folds.is_empty() {
        return;
    }
    let mut remove = HashSet::new();
    let mut old_reads = HashSet::new();
    for f in folds {
        for (a, mm_out) in f.drops {
            let out = g.node[a].output[0].clone();
            old_reads.extend(g.node[a].input.iter().cloned());
            for n in g.node.iter_mut() {
                for t in n.input.iter_mut().filter(|t| **t == out) {
                    *t = mm_out.clone();
                }
            }
            g.value_info
                .retain(|vi| vi.name.as_deref() != Some(out.as_str()));
            remove.insert(a);
        }
        if let Some((n, k, t)) = f.new_bias {
            old_reads.insert(g.node[n].input[k].clone());
            g.node[n].input[k] = t.name.clone().unwrap_or_default();
            g.initializer.push(t);
        }
    }
    let old = std::mem::take(&mut g.node);
    g.node = old
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !remove.contains(i))
        .map(|(_, n)| n)
        .collect();
    super::rewrite::drop_unread_initializers(g, &old_reads);
}
