//! The decomposed attention pattern, anchored on a Softmax: walk up the score path
//! (masks, softcap, scale factors, the score MatMul, Q and the transposed K) and down the
//! probability path (Cast, NaN guard, inference Dropout, the MatMul with V), checking each step.

use std::collections::HashSet;

use super::gqa;
use super::mask::{self, MaskTerm};
use super::plan::{self, Names, Plan, Summary};
use super::reason::Skip;
use crate::graph::onnx::NodeProto;
use crate::graph::shapes::Dim;
use crate::graph::tensor;
use crate::graph::view::{attr_i, attr_ints, is_op, node_label, GraphView};

/// Below this a Where fill or mask value counts as "masked" (−10000 is the smallest magnitude
/// exporters use; anything at or under it gives exp() = 0 in every float type after softmax).
pub const MASK_FILL_MAX: f64 = -1.0e4;

/// Matching state for one site.
struct Site<'v, 'g> {
    v: &'v GraphView<'g>,
    core: Vec<usize>,
    scale: f64,
}

impl<'v, 'g> Site<'v, 'g> {
    fn label(&self, i: usize) -> String {
        node_label(self.v.node(i))
    }

    /// A float scalar constant, or None.
    fn const_scalar(&self, name: &str) -> Option<f64> {
        let info = self.v.infos.get(name)?;
        if !info.is_single() {
            return None;
        }
        self.v.scalar(name)
    }

    /// For `Mul`/`Div` node `i`, the factor it applies to its data input and that input's name.
    /// `Ok(None)` when neither operand is single-element (so this is no scale);
    /// `Err` when a single-element operand is not a constant.
    fn scalar_factor(&self, i: usize, data: &str) -> Result<Option<(f64, String)>, Skip> {
        let n = self.v.node(i);
        let (a, b) = (
            n.input.first().map(String::as_str),
            n.input.get(1).map(String::as_str),
        );
        let (Some(a), Some(b)) = (a, b) else {
            return Ok(None);
        };
        let data_rank = self.v.rank(data);
        let is_factor = |s: &str| {
            self.v.infos.get(s).is_some_and(|i| i.is_single())
                && match (self.v.rank(s), data_rank) {
                    (Some(r), Some(d)) => r <= d,
                    _ => false,
                }
        };
        let div = is_op(n, "Div");
        let (other, factor_name) = if b != data && is_factor(b) {
            (a, b)
        } else if !div && a != data && is_factor(a) {
            (b, a)
        } else {
            return Ok(None);
        };
        let Some(c) = self.const_scalar(factor_name) else {
            return Err(Skip::new(
                "scale-not-constant",
                self.label(i),
                format!("factor '{factor_name}' is not a constant scalar"),
            ));
        };
        if c == 0.0 || !c.is_finite() {
            return Err(Skip::new(
                "scale-not-constant",
                self.label(i),
                format!("factor {c} is not a usable scale"),
            ));
        }
        Ok(Some((if div { 1.0 / c } else { c }, other.to_string())))
    }

    /// Checks that `name` (an intermediate of the site) is read only by `reader` and is not a
    /// graph output.
    fn only_read_by(&self, name: &str, reader: usize) -> Result<(), Skip> {
        if self.v.is_graph_output(name) {
            return Err(Skip::new(
                "intermediate-is-graph-output",
                self.label(reader),
                format!("'{name}' is a graph output"),
            ));
        }
        if let Some(&other) = self
            .v
            .consumers(name)
            .iter()
            .find(|&&c| c != reader && !shape_only(self.v, c))
        {
            return Err(Skip::new(
                "intermediate-has-other-consumers",
                self.label(other),
                format!("'{name}' is also read by {}", self.label(other)),
            ));
        }
        Ok(())
    }

    /// Walks scalar Mul/Div factors up from `t`, folding them into the scale; each passed tensor
    /// must belong to the site. Returns the tensor above the factors.
    fn walk_factors(&mut self, mut t: String, mut reader: usize) -> Result<String, Skip> {
        loop {
            let Some(p) = self.v.producer(&t) else {
                return Ok(t);
            };
            let n = self.v.node(p);
            if !(is_op(n, "Mul") || is_op(n, "Div")) {
                return Ok(t);
            }
            // The data input is the non-factor one; try with either as data.
            let a = n.input.first().cloned().unwrap_or_default();
            let b = n.input.get(1).cloned().unwrap_or_default();
            let found = match self.scalar_factor(p, &a)? {
                Some(f) => Some(f),
                None if is_op(n, "Mul") => self.scalar_factor(p, &b)?,
                None => None,
            };
            let Some((f, data)) = found else { return Ok(t) };
            self.only_read_by(&t, reader)?;
            self.scale *= f;
            self.core.push(p);
            t = data;
            reader = p;
        }
    }

    /// Whether `t` is computed from a MatMul through score-path ops (bounded search).
    fn leads_to_matmul(&self, t: &str, depth: usize) -> bool {
        let Some(p) = self.v.producer(t) else {
            return false;
        };
        let n = self.v.node(p);
        if is_op(n, "MatMul") {
            return true;
        }
        if depth == 0 {
            return false;
        }
        let follow: &[usize] = match n.op_type.as_deref().unwrap_or("") {
            "Cast" | "Tanh" | "Reshape" | "Identity" => &[0],
            "Mul" | "Div" | "Add" | "Sub" => &[0, 1],
            "Where" => &[1, 2],
            _ => &[],
        };
        follow
            .iter()
            .filter_map(|&k| n.input.get(k))
            .any(|s| self.leads_to_matmul(s, depth - 1))
    }
}

/// Matches the site around Softmax node `sm`. `opset` is the default domain's version (Softmax's
/// default axis changed in 13).
pub fn match_softmax(
    v: &GraphView,
    sm: usize,
    opset: i64,
    names: &mut Names,
) -> Result<Plan, Skip> {
    let mut s = Site {
        v,
        core: vec![sm],
        scale: 1.0,
    };
    let smn = v.node(sm);
    let x = smn.input.first().cloned().unwrap_or_default();
    let rank = v.rank(&x).ok_or_else(|| {
        Skip::new(
            "rank-unknown",
            s.label(sm),
            format!("rank of '{x}' unknown"),
        )
    })?;
    let axis = attr_i(smn, "axis").unwrap_or(if opset >= 13 { -1 } else { 1 });
    let axis = if axis < 0 { axis + rank as i64 } else { axis };
    if axis != rank as i64 - 1 {
        return Err(Skip::new(
            "softmax-not-last-axis",
            s.label(sm),
            format!("axis {axis} of a rank-{rank} input"),
        ));
    }

    // Down: Softmax → [Cast] → [NaN guard] → [Dropout] → [Cast] → MatMul(P, V).
    let mut y = smn.output.first().cloned().unwrap_or_default();
    let mut reader_of_y = sm;
    let pv = loop {
        if v.is_graph_output(&y) {
            return Err(Skip::new(
                "intermediate-is-graph-output",
                s.label(reader_of_y),
                format!("'{y}' is a graph output"),
            ));
        }
        let cons = v.consumers(&y);
        if let Some(guard) = nan_guard(v, &y) {
            s.core.extend([guard.0, guard.1]);
            y = v.node(guard.1).output[0].clone();
            reader_of_y = guard.1;
            continue;
        }
        let &[c] = cons else {
            return match cons.first() {
                None => Err(Skip::new(
                    "pv-matmul-missing",
                    s.label(reader_of_y),
                    format!("'{y}' is not used"),
                )),
                Some(_) => Err(Skip::new(
                    "intermediate-has-other-consumers",
                    s.label(cons[1]),
                    format!("'{y}' is read by {} nodes", cons.len()),
                )),
            };
        };
        let n = v.node(c);
        if is_op(n, "Cast") || is_op(n, "Identity") {
            s.core.push(c);
            y = n.output[0].clone();
            reader_of_y = c;
        } else if is_op(n, "Dropout") {
            check_dropout(v, c)?;
            if let Some(mask_out) = n.output.get(1).filter(|m| !m.is_empty()) {
                if !v.consumers(mask_out).is_empty() || v.is_graph_output(mask_out) {
                    return Err(Skip::new(
                        "intermediate-has-other-consumers",
                        s.label(c),
                        "the Dropout mask is used",
                    ));
                }
            }
            s.core.push(c);
            y = n.output[0].clone();
            reader_of_y = c;
        } else if is_op(n, "MatMul") {
            if n.input.first() != Some(&y) {
                return Err(Skip::new(
                    "pv-order-unexpected",
                    s.label(c),
                    "probabilities are the right operand",
                ));
            }
            break c;
        } else {
            return Err(Skip::new(
                "pv-matmul-missing",
                s.label(c),
                format!("'{y}' goes into {}", n.op_type.as_deref().unwrap_or("?")),
            ));
        }
    };
    s.core.push(pv);
    let pvn = v.node(pv);
    let v_in = pvn.input.get(1).cloned().unwrap_or_default();
    let y_out = pvn.output.first().cloned().unwrap_or_default();

    // Up: Softmax ← [Cast] ← masks ← [softcap] ← scale factors ← MatMul(Q, Kᵀ).
    let mut t = x.clone();
    let mut reader = sm;
    let mut masks: Vec<MaskTerm> = Vec::new();
    let mut softcap: Option<f64> = None;
    // 0: masks allowed; 1: softcap seen; 2: a scale factor seen (nothing but factors above).
    let mut phase = 0;
    let qk = loop {
        let Some(p) = v.producer(&t) else {
            return Err(Skip::new(
                "no-score-matmul",
                s.label(reader),
                format!("'{t}' has no producer"),
            ));
        };
        s.only_read_by(&t, reader)?;
        let n = v.node(p);
        let op = n.op_type.as_deref().unwrap_or("");
        let ins: Vec<String> = n.input.clone();
        match op {
            _ if !is_op(n, op) => {
                return Err(Skip::new(
                    "score-op-unsupported",
                    s.label(p),
                    format!("custom op {op} on the score path"),
                ));
            }
            "Cast" | "Identity" => t = ins[0].clone(),
            "Add" => {
                let (score, other) = pick_score_side(&s, p, &ins[0], &ins[1])?;
                if phase > 0 {
                    return Err(Skip::new(
                        "mask-before-scale",
                        s.label(p),
                        "an additive mask/bias is applied before scaling or softcap",
                    ));
                }
                masks.push(MaskTerm::Additive(other));
                t = score;
            }
            "Where" if ins.len() == 3 => {
                let (score, fill) = pick_score_side(&s, p, &ins[1], &ins[2])?;
                let keep_when_true = score == ins[1];
                let fill_v = s.const_scalar(&fill).filter(|f| *f <= MASK_FILL_MAX);
                if fill_v.is_none() {
                    return Err(Skip::new(
                        "mask-fill-not-negative",
                        s.label(p),
                        format!("fill '{fill}' is not a constant ≤ {MASK_FILL_MAX}"),
                    ));
                }
                if phase > 0 {
                    return Err(Skip::new(
                        "mask-before-scale",
                        s.label(p),
                        "a boolean mask is applied before scaling or softcap",
                    ));
                }
                masks.push(MaskTerm::Select {
                    cond: ins[0].clone(),
                    keep_when_true,
                    fill,
                });
                t = score;
            }
            "Mul" | "Div" => {
                if let Some((cap, inner, nodes)) = softcap_at(&s, p)? {
                    if phase > 1 || softcap.is_some() {
                        return Err(Skip::new(
                            "softcap-unrecognized",
                            s.label(p),
                            "softcap after a scale factor or twice",
                        ));
                    }
                    softcap = Some(cap);
                    phase = 1;
                    s.core.extend(nodes);
                    t = inner;
                    reader = *s.core.last().unwrap_or(&p);
                    continue;
                }
                let found = match s.scalar_factor(p, &ins[0])? {
                    Some(f) => Some(f),
                    None if op == "Mul" => s.scalar_factor(p, &ins[1])?,
                    None => None,
                };
                let Some((f, data)) = found else {
                    return Err(Skip::new(
                        "scale-not-constant",
                        s.label(p),
                        "a Mul/Div on the score path with no constant scalar operand",
                    ));
                };
                // Met after softcap (walking up) means applied before it: that is the operator's
                // order (scale, then softcap). A factor after softcap was met first and set phase 2.
                s.scale *= f;
                phase = 2;
                t = data;
            }
            "MatMul" => break p,
            "Reshape" => {
                return Err(Skip::new(
                    "score-op-unsupported",
                    s.label(p),
                    "a Reshape on the score path (3D batched attention)",
                ));
            }
            _ => {
                return Err(Skip::new(
                    "score-op-unsupported",
                    s.label(p),
                    format!("{op} between the score MatMul and the Softmax"),
                ))
            }
        }
        s.core.push(p);
        reader = p;
    };
    s.core.push(qk);
    let qkn = v.node(qk);
    let scores = qkn.output[0].clone();
    let (q_raw, kt_raw) = (qkn.input[0].clone(), qkn.input[1].clone());

    // Q: scale factors, then the rank-4 query.
    let q = s.walk_factors(q_raw, qk)?;
    // Kᵀ: factors, the transpose spelling, factors again.
    let kt = s.walk_factors(kt_raw, qk)?;
    let kt_reader = s
        .core
        .iter()
        .rev()
        .find(|&&i| v.node(i).input.contains(&kt))
        .copied()
        .unwrap_or(qk);
    let mut extra_nodes: Vec<NodeProto> = Vec::new();
    let k = untranspose_k(&mut s, &kt, kt_reader, names, &mut extra_nodes)?;
    let k_reader = s.core.last().copied().unwrap_or(qk);
    let k = match k {
        Untransposed::Same(k) => s.walk_factors(k, k_reader)?,
        Untransposed::New(k) => k,
    };

    // GQA: read the un-repeated heads when the repeat is proven on both K and V (folding only
    // one would pair Hkv keys with Hq values).
    let k_reader = s
        .core
        .iter()
        .rev()
        .find(|&&i| v.node(i).input.contains(&k))
        .copied()
        .unwrap_or(qk);
    let (k, vv, gqa) = match (
        gqa::fold_repeat_kv(v, &k, k_reader),
        gqa::fold_repeat_kv(v, &v_in, pv),
    ) {
        (Some((kb, kn)), Some((vb, vn))) => {
            s.core.extend(kn);
            s.core.extend(vn);
            (kb, vb, true)
        }
        _ => (k, v_in.clone(), false),
    };

    // Shapes, types and head counts.
    let (qd, kd, vd) = (v.dims(&q), dims_of_k(v, &k, &extra_nodes), v.dims(&vv));
    let (Some(qd), Some(vd)) = (qd, vd) else {
        return Err(Skip::new(
            "rank-unknown",
            s.label(qk),
            "rank of Q or V unknown",
        ));
    };
    let Some(kd) = kd else {
        return Err(Skip::new("rank-unknown", s.label(qk), "rank of K unknown"));
    };
    // 3D batched [B·H, S, D] tensors run as 4D [1, B·H, S, D]: one batch of B·H heads.
    let batched3d = qd.len() == 3 && kd.len() == 3 && vd.len() == 3;
    let lift = |d: &[Dim]| -> Vec<Dim> {
        if batched3d {
            std::iter::once(Dim::Val(1))
                .chain(d.iter().cloned())
                .collect()
        } else {
            d.to_vec()
        }
    };
    let (qd, kd, vd) = (lift(qd), lift(&kd), lift(vd));
    if batched3d && rank != 3 {
        return Err(Skip::new(
            "mask-not-broadcastable",
            s.label(sm),
            format!("3D batched attention whose scores have rank {rank}"),
        ));
    }
    if qd.len() != 4 || kd.len() != 4 || vd.len() != 4 {
        return Err(Skip::new(
            "rank-unsupported",
            s.label(qk),
            format!(
                "Q, K, V ranks {}, {}, {} (need 4)",
                qd.len(),
                kd.len(),
                vd.len()
            ),
        ));
    }
    let elem = v.elem(&q);
    let ok_types = elem.is_some_and(tensor::is_attention_float)
        && (v.elem(&vv).is_none() || v.elem(&vv) == elem);
    if !ok_types {
        return Err(Skip::new(
            "dtype-unsupported",
            s.label(qk),
            format!("Q type {elem:?}, V type {:?}", v.elem(&vv)),
        ));
    }
    if let (Dim::Val(a), Dim::Val(b)) = (&qd[3], &kd[3]) {
        if a != b {
            return Err(Skip::new(
                "head-dim-mismatch",
                s.label(qk),
                format!("Q head dim {a}, K head dim {b}"),
            ));
        }
    }
    if let (Dim::Val(hq), Dim::Val(hk)) = (&qd[1], &kd[1]) {
        if *hk <= 0 || hq % hk != 0 {
            return Err(Skip::new(
                "heads-not-divisible",
                s.label(qk),
                format!("{hq} query heads, {hk} key heads"),
            ));
        }
    }
    for (d, what) in [(&kd[0], "K"), (&vd[0], "V")] {
        if let (Dim::Val(a), Dim::Val(b)) = (&qd[0], d) {
            if a != b {
                return Err(Skip::new(
                    "batch-mismatch",
                    s.label(qk),
                    format!("Q batch {a}, {what} batch {b}"),
                ));
            }
        }
    }

    // Every tensor between the site's inputs and its output stays inside it.
    let core: HashSet<usize> = s.core.iter().copied().collect();
    for &i in &core {
        for o in v
            .node(i)
            .output
            .iter()
            .filter(|o| !o.is_empty() && **o != y_out)
        {
            if v.is_graph_output(o) {
                return Err(Skip::new(
                    "intermediate-is-graph-output",
                    s.label(i),
                    format!("'{o}' is a graph output"),
                ));
            }
            if let Some(&c) = v
                .consumers(o)
                .iter()
                .find(|&&c| !core.contains(&c) && !shape_only(v, c))
            {
                return Err(Skip::new(
                    "intermediate-has-other-consumers",
                    s.label(c),
                    format!("'{o}' is also read by {}", s.label(c)),
                ));
            }
        }
    }

    // The mask: causal proven → is_causal; the rest combined into one attn_mask.
    let score_dims = v.dims(&scores).map(lift);
    if batched3d && score_dims.as_ref().is_none_or(|d| d.len() != 4) {
        return Err(Skip::new(
            "rank-unsupported",
            s.label(qk),
            "3D batched scores are not rank 3",
        ));
    }
    let m = mask::build(
        v,
        &masks,
        &qd,
        &kd,
        score_dims.as_deref(),
        elem,
        names,
        &s.label(sm),
    )?;
    extra_nodes.extend(m.nodes);

    let base = names.fresh(&format!("{}/FlashAttention", s.label(sm)));
    let mut attrs = vec![plan::attr_float("scale", s.scale as f32)];
    if m.is_causal {
        attrs.push(plan::attr_int("is_causal", 1));
    }
    if let Some(w) = m.window_left {
        attrs.push(plan::attr_int("window_left", w));
    }
    if let Some(c) = softcap {
        attrs.push(plan::attr_float("softcap", c as f32));
    }
    let mut inputs = vec![
        q.clone(),
        k.clone(),
        vv.clone(),
        m.tensor.clone().unwrap_or_default(),
    ];
    let mut out = y_out.clone();
    if batched3d {
        // Unsqueeze Q, K, V and the mask at axis 0, run, squeeze Y back to [B·H, S, Dv].
        let mut axes = plan::Axes::new(opset, names, &s.label(sm), &mut extra_nodes);
        for t in inputs.iter_mut().filter(|t| !t.is_empty()) {
            *t = axes.apply("Unsqueeze", t, names, &mut extra_nodes);
        }
        out = names.fresh(&format!("{y_out}/bhsd"));
    }
    extra_nodes.push(plan::flash_node(base, inputs, vec![out.clone()], attrs));
    if batched3d {
        let mut axes = plan::Axes::new(opset, names, &s.label(sm), &mut extra_nodes);
        axes.apply_to("Squeeze", &out, &y_out, names, &mut extra_nodes);
    }

    let mut remove: Vec<usize> = core.into_iter().collect();
    remove.sort_unstable();
    Ok(Plan {
        remove,
        anchor: pv,
        new_nodes: extra_nodes,
        summary: Summary {
            scale: Some(s.scale as f32),
            is_causal: m.is_causal,
            softcap: softcap.map(|c| c as f32),
            mask: m.description,
            gqa_folded: gqa,
            layout: if batched3d {
                "3D batched [B·H, S, D]".into()
            } else {
                "BHSD".into()
            },
            layout_note: None,
            qkv_pack: None,
            bias_fold: None,
        },
    })
}

/// Whether node `c` reads only the shape of its input (a `Shape` node). Such readers do not
/// stop a fusion: the rewrite removes a site's nodes only once nothing reads them, so a tensor
/// whose shape is still needed elsewhere is kept and stays correct.
pub fn shape_only(v: &GraphView, c: usize) -> bool {
    is_op(v.node(c), "Shape")
}

/// For an Add/Where node, (score-side input, other input).
fn pick_score_side(s: &Site, p: usize, a: &str, b: &str) -> Result<(String, String), Skip> {
    match (s.leads_to_matmul(a, 8), s.leads_to_matmul(b, 8)) {
        (true, false) => Ok((a.into(), b.into())),
        (false, true) => Ok((b.into(), a.into())),
        (true, true) => Err(Skip::new(
            "score-path-ambiguous",
            s.label(p),
            "both operands come from a MatMul",
        )),
        (false, false) => Err(Skip::new(
            "no-score-matmul",
            s.label(p),
            "neither operand comes from a MatMul",
        )),
    }
}

/// `Where(IsNaN(p), 0, p)` after the Softmax: (IsNaN node, Where node).
fn nan_guard(v: &GraphView, p: &str) -> Option<(usize, usize)> {
    let cons = v.consumers(p);
    if cons.len() != 2 {
        return None;
    }
    let isnan = *cons.iter().find(|&&c| is_op(v.node(c), "IsNaN"))?;
    let flag = v.node(isnan).output.first()?;
    let w = *cons.iter().find(|&&c| c != isnan)?;
    let wn = v.node(w);
    let ok = is_op(wn, "Where")
        && wn.input.first() == Some(flag)
        && wn.input.get(2).map(String::as_str) == Some(p)
        && wn.input.get(1).and_then(|z| v.scalar(z)) == Some(0.0)
        && v.consumers(flag) == [w]
        && !v.is_graph_output(flag);
    ok.then_some((isnan, w))
}

/// Dropout must be a no-op: no training_mode input (or a constant false), or ratio 0.
fn check_dropout(v: &GraphView, i: usize) -> Result<(), Skip> {
    let n = v.node(i);
    let ratio_zero = match n.input.get(1).filter(|s| !s.is_empty()) {
        Some(r) => v.scalar(r) == Some(0.0),
        None => false,
    };
    let training = match n.input.get(2).filter(|s| !s.is_empty()) {
        None => false,
        Some(t) => match v.constant(t).and_then(tensor::ints) {
            Some(vals) => vals.iter().any(|&x| x != 0),
            None => true,
        },
    };
    // Opset < 12 Dropout has an is_test attribute instead; ONNX defines it as inference-only since 7.
    if training && !ratio_zero {
        return Err(Skip::new(
            "dropout-in-training",
            node_label(n),
            "training_mode is not a constant false and ratio is not 0",
        ));
    }
    Ok(())
}

/// softcap · tanh(x / softcap) ending at Mul node `p`: (softcap, x, nodes).
fn softcap_at(s: &Site, p: usize) -> Result<Option<(f64, String, Vec<usize>)>, Skip> {
    let v = s.v;
    let n = v.node(p);
    if !is_op(n, "Mul") {
        return Ok(None);
    }
    let (tanh_out, c_out) = match (n.input.first(), n.input.get(1)) {
        (Some(a), Some(b)) if v.producer_op(a, "Tanh").is_some() => (a, b),
        (Some(a), Some(b)) if v.producer_op(b, "Tanh").is_some() => (b, a),
        _ => return Ok(None),
    };
    let th = v.producer_op(tanh_out, "Tanh").unwrap_or(p);
    let Some(c) = s.const_scalar(c_out) else {
        return Err(Skip::new(
            "softcap-unrecognized",
            s.label(p),
            "the factor after Tanh is not a constant",
        ));
    };
    s.only_read_by(tanh_out, p)?;
    let tin = v.node(th).input[0].clone();
    let Some(d) = v.producer(&tin) else {
        return Err(Skip::new(
            "softcap-unrecognized",
            s.label(th),
            "no division before Tanh",
        ));
    };
    s.only_read_by(&tin, th)?;
    let dn = v.node(d);
    let (Some(a), Some(b)) = (dn.input.first(), dn.input.get(1)) else {
        return Err(Skip::new(
            "softcap-unrecognized",
            s.label(d),
            "no division before Tanh",
        ));
    };
    let (inner, c1) = if is_op(dn, "Div") {
        (a.clone(), s.const_scalar(b))
    } else if is_op(dn, "Mul") {
        match (s.const_scalar(b), s.const_scalar(a)) {
            (Some(m), _) => (a.clone(), Some(1.0 / m)),
            (None, Some(m)) => (b.clone(), Some(1.0 / m)),
            _ => (a.clone(), None),
        }
    } else {
        (a.clone(), None)
    };
    match c1 {
        Some(c1) if c > 0.0 && ((c1 - c) / c).abs() < 1e-5 => Ok(Some((c, inner, vec![p, th, d]))),
        _ => Err(Skip::new(
            "softcap-unrecognized",
            s.label(th),
            format!("tanh(x / {c1:?}) · {c}: the two constants differ"),
        )),
    }
}

/// The result of undoing the transpose on the K path.
enum Untransposed {
    /// An existing tensor in [B, H, S, D].
    Same(String),
    /// A new tensor made by a node added to `extra`.
    New(String),
}

/// Undoes the transposition of K: 4D Transpose [0,1,3,2], BSHD→BHDS Transpose [0,2,3,1], or the
/// dynamo exporter's Reshape([B·H,S,D]) → Transpose[0,2,1] → Reshape([B,H,D,S]).
fn untranspose_k(
    s: &mut Site,
    kt: &str,
    reader: usize,
    names: &mut Names,
    extra: &mut Vec<NodeProto>,
) -> Result<Untransposed, Skip> {
    let v = s.v;
    let fail = |s: &Site, why: String| Skip::new("k-transpose-unrecognized", s.label(reader), why);
    let Some(p) = v.producer(kt) else {
        return Err(fail(s, format!("'{kt}' is not produced by a transpose")));
    };
    s.only_read_by(kt, reader)?;
    let n = v.node(p);
    if is_op(n, "Transpose") {
        let x = n.input[0].clone();
        let perm = attr_ints(n, "perm").unwrap_or_default();
        match v.rank(&x) {
            Some(4) => {}
            // 3D batched attention: [B·H, S, D] with Kᵀ = Transpose[0, 2, 1].
            Some(3) if perm == [0, 2, 1] => {
                s.core.push(p);
                return Ok(Untransposed::Same(x));
            }
            Some(r) => {
                return Err(Skip::new(
                    "rank-unsupported",
                    s.label(p),
                    format!("K '{x}' has rank {r} (need 4)"),
                ))
            }
            None => {
                return Err(Skip::new(
                    "rank-unknown",
                    s.label(p),
                    format!("rank of K '{x}' unknown"),
                ))
            }
        }
        if perm == [0, 1, 3, 2] {
            s.core.push(p);
            return Ok(Untransposed::Same(x));
        }
        if perm == [0, 2, 3, 1] {
            s.core.push(p);
            let out = names.fresh(&format!("{x}/bhsd"));
            let nm = names.fresh(&format!("{}/to_bhsd", node_label(n)));
            extra.push(plan::node(
                "Transpose",
                nm,
                vec![x],
                vec![out.clone()],
                vec![plan::attr_ints("perm", &[0, 2, 1, 3])],
            ));
            return Ok(Untransposed::New(out));
        }
        return Err(fail(s, format!("Transpose perm {perm:?}")));
    }
    if is_op(n, "Reshape") {
        // Reshape(Transpose[0,2,1](Reshape(k, [B·H, S, D])), [B, H, D, S]).
        let t_out = n.input[0].clone();
        let tp = v
            .producer_op(&t_out, "Transpose")
            .ok_or_else(|| fail(s, "Reshape not preceded by a Transpose".into()))?;
        let tn = v.node(tp);
        if attr_ints(tn, "perm").unwrap_or_default() != [0, 2, 1] {
            return Err(fail(s, "3D transpose is not [0, 2, 1]".into()));
        }
        let r_out = tn.input[0].clone();
        let r1 = v
            .producer_op(&r_out, "Reshape")
            .ok_or_else(|| fail(s, "3D transpose not preceded by a Reshape".into()))?;
        let k = v.node(r1).input[0].clone();
        let (Some(kd), Some(r1d), Some(outd)) = (v.dims(&k), v.dims(&r_out), v.dims(kt)) else {
            return Err(fail(s, "shapes around the 3D transpose are unknown".into()));
        };
        let proven = kd.len() == 4
            && r1d.len() == 3
            && outd.len() == 4
            && r1d[1] == kd[2]
            && r1d[2] == kd[3]
            && outd[0] == kd[0]
            && outd[1] == kd[1]
            && outd[2] == kd[3]
            && outd[3] == kd[2];
        if !proven {
            return Err(fail(s, format!("Reshape→Transpose→Reshape maps {kd:?} to {outd:?}, not a swap of the last two axes")));
        }
        s.only_read_by(&t_out, p)?;
        s.only_read_by(&r_out, tp)?;
        s.core.extend([p, tp, r1]);
        return Ok(Untransposed::Same(k));
    }
    Err(fail(
        s,
        format!("'{kt}' comes from {}", n.op_type.as_deref().unwrap_or("?")),
    ))
}

fn dims_of_k(v: &GraphView, k: &str, extra: &[NodeProto]) -> Option<Vec<Dim>> {
    if let Some(d) = v.dims(k) {
        return Some(d.to_vec());
    }
    // K made by our own BSHD→BHSD transpose.
    let n = extra
        .iter()
        .find(|n| n.output.first().map(String::as_str) == Some(k))?;
    let x = v.dims(&n.input[0])?;
    (x.len() == 4).then(|| vec![x[0].clone(), x[2].clone(), x[1].clone(), x[3].clone()])
}
