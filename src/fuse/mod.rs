//! Finding attention sites, checking them and rewriting each into one `com.flash.FlashAttention`
//! node. Every Softmax and every ONNX `Attention` node is a candidate site; each ends fused or
//! skipped with a reason. Main graph, subgraphs (If/Loop/Scan bodies) and functions are searched.

pub mod bias_fold;
pub mod causal;
pub mod decomposed;
pub mod gqa;
pub mod layout;
pub mod mask;
pub mod pack_qkv;
pub mod padding_mask;
pub mod plan;
pub mod reason;
pub mod report;
pub mod rewrite;
pub mod standard;

use std::collections::HashSet;

use crate::graph::onnx::{GraphProto, ModelProto, OperatorSetIdProto, ValueInfoProto};
use crate::graph::shapes::Infos;
use crate::graph::view::{is_op, node_label, GraphView};
pub use plan::{DOMAIN, OP_TYPE};
pub use reason::Skip;
pub use report::{Report, SiteReport};

/// What a run does besides finding sites.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Rewrite the fusable sites (else only report them).
    pub apply: bool,
    /// Pack each fused site's Q, K and V projections into one MatMul (fuse::pack_qkv).
    pub pack_qkv: bool,
    /// Remove the K and V bias Adds the fused node makes redundant (fuse::bias_fold).
    pub fold_bias: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            apply: true,
            pack_qkv: true,
            fold_bias: true,
        }
    }
}

/// Finds every site; rewrites the fusable ones when `apply` is true (else only reports).
/// Q/K/V projections are packed; [`fuse_model_with`] can turn that off.
pub fn fuse_model(model: &mut ModelProto, apply: bool) -> Report {
    fuse_model_with(
        model,
        &Options {
            apply,
            ..Default::default()
        },
    )
}

/// [`fuse_model`] with every choice spelled out.
pub fn fuse_model_with(model: &mut ModelProto, opts: &Options) -> Report {
    let apply = opts.apply;
    let opset = opset_of(&model.opset_import, "");
    let mut report = Report::default();
    if let Some(g) = model.graph.as_mut() {
        fuse_graph(g, "main", opset, None, opts, &mut report);
    }
    let mut fused_in_functions = Vec::new();
    for (fi, f) in model.functions.iter_mut().enumerate() {
        let fopset = match opset_of(&f.opset_import, "") {
            0 => opset,
            o => o,
        };
        // A function body is searched as a graph whose inputs have unknown types.
        let mut g = GraphProto {
            node: std::mem::take(&mut f.node),
            input: f
                .input
                .iter()
                .map(|n| ValueInfoProto {
                    name: Some(n.clone()),
                    ..Default::default()
                })
                .collect(),
            output: f
                .output
                .iter()
                .map(|n| ValueInfoProto {
                    name: Some(n.clone()),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let before = report.fused;
        let path = format!("function:{}", f.name.as_deref().unwrap_or("?"));
        fuse_graph(&mut g, &path, fopset, None, opts, &mut report);
        f.node = g.node;
        if report.fused > before {
            fused_in_functions.push(fi);
        }
    }
    if apply && report.fused > 0 {
        add_opset(&mut model.opset_import);
        for fi in fused_in_functions {
            add_opset(&mut model.functions[fi].opset_import);
        }
    }
    report
}

/// The version imported for `domain` ("" = default ONNX domain), 0 if none.
pub fn opset_of(imports: &[OperatorSetIdProto], domain: &str) -> i64 {
    imports
        .iter()
        .find(|o| {
            o.domain.as_deref().unwrap_or("") == domain
                || (domain.is_empty() && o.domain.as_deref() == Some("ai.onnx"))
        })
        .and_then(|o| o.version)
        .unwrap_or(0)
}

fn add_opset(imports: &mut Vec<OperatorSetIdProto>) {
    if !imports.iter().any(|o| o.domain.as_deref() == Some(DOMAIN)) {
        imports.push(OperatorSetIdProto {
            domain: Some(DOMAIN.into()),
            version: Some(1),
        });
    }
}

fn fuse_graph(
    g: &mut GraphProto,
    path: &str,
    opset: i64,
    outer: Option<&Infos>,
    opts: &Options,
    report: &mut Report,
) {
    let apply = opts.apply;
    let (plans, infos) = {
        let view = GraphView::new(g, outer);
        let mut names = plan::Names::new(g);
        let mut claimed: HashSet<usize> = HashSet::new();
        let mut plans = Vec::new();
        for i in 0..g.node.len() {
            let n = view.node(i);
            let (kind, result) = if is_op(n, "Softmax") {
                (
                    "decomposed",
                    decomposed::match_softmax(&view, i, opset, &mut names),
                )
            } else if is_op(n, "Attention") {
                (
                    "onnx-attention",
                    standard::match_attention(&view, i, &mut names),
                )
            } else {
                continue;
            };
            let result = result.and_then(|p| match p.remove.iter().find(|r| claimed.contains(r)) {
                Some(&r) => Err(Skip::new(
                    "node-claimed",
                    node_label(view.node(r)),
                    "already part of another site",
                )),
                None => Ok(p),
            });
            match result {
                Ok(p) => {
                    claimed.extend(p.remove.iter().copied());
                    report
                        .sites
                        .push(SiteReport::fused(path, kind, &view, i, &p));
                    report.fused += 1;
                    plans.push(p);
                }
                Err(skip) => {
                    report
                        .sites
                        .push(SiteReport::skipped(path, kind, node_label(n), skip));
                    report.skipped += 1;
                }
            }
        }
        (plans, view.infos)
    };
    if apply && !plans.is_empty() {
        rewrite::apply(g, &plans);
        // Second pass over the result: fused nodes that can read the [B, S, H·D] projections.
        let (folded, unfolded) = layout::plans(&GraphView::new(g, outer));
        for u in &unfolded {
            report.note_unfolded(path, &u.node, &u.reason);
        }
        if !folded.is_empty() {
            for f in &folded {
                report.note_folded(path, &f.node, &f.folded, &f.kept);
            }
            let plans: Vec<plan::Plan> = folded.into_iter().map(|f| f.plan).collect();
            rewrite::apply(g, &plans);
        }
        let rewires = padding_mask::plans(&GraphView::new(g, outer));
        for r in &rewires {
            for node in &r.nodes {
                report.note_mask(path, node, &r.note);
            }
        }
        padding_mask::apply(g, &rewires, opset);
        if opts.fold_bias {
            let folds = bias_fold::plans(&GraphView::new(g, outer));
            for f in &folds {
                report.note_bias_fold(path, &f.node, &f.note);
            }
            bias_fold::apply(g, folds);
        }
        if opts.pack_qkv {
            pack_projections(g, path, opset, outer, report);
        }
    }
    // Subgraphs see the outer graph's tensors.
    for n in g.node.iter_mut() {
        let label = node_label(n);
        for a in n.attribute.iter_mut() {
            let an = a.name.clone().unwrap_or_default();
            if let Some(sub) = a.g.as_mut() {
                fuse_graph(
                    sub,
                    &format!("{path}/{label}.{an}"),
                    opset,
                    Some(&infos),
                    opts,
                    report,
                );
            }
            for (k, sub) in a.graphs.iter_mut().enumerate() {
                fuse_graph(
                    sub,
                    &format!("{path}/{label}.{an}[{k}]"),
                    opset,
                    Some(&infos),
                    opts,
                    report,
                );
            }
        }
    }
}

/// Third pass: each fused node's Q, K and V projections packed into one MatMul.
fn pack_projections(
    g: &mut GraphProto,
    path: &str,
    opset: i64,
    outer: Option<&Infos>,
    report: &mut Report,
) {
    let (packed, unpacked) = pack_qkv::plans(&GraphView::new(g, outer), opset);
    for u in &unpacked {
        report.note_unpacked(path, &u.node, u.code, &u.detail);
    }
    for p in &packed {
        report.note_packed(path, &p.node, &p.note);
    }
    pack_qkv::apply(g, packed);
}
