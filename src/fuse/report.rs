//! The report of one run: every site, fused (with what the fused node does) or skipped (with
//! the reason code, the node and a sentence). Printed for humans and written as JSON.

use serde::Serialize;

use super::plan::{Plan, Summary};
use super::reason::Skip;
use crate::graph::view::{node_label, GraphView};

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub fused: usize,
    pub skipped: usize,
    pub sites: Vec<SiteReport>,
}

#[derive(Debug, Serialize)]
pub struct SiteReport {
    /// "main", "function:NAME" or the path of a subgraph.
    pub graph: String,
    /// "decomposed" (MatMul → Softmax → MatMul) or "onnx-attention".
    pub kind: &'static str,
    /// The Softmax or Attention node the site was found from.
    pub anchor: String,
    /// "fused" or "skipped".
    pub status: &'static str,
    /// Nodes the fused node replaces.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replaced: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fused_node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<Summary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Skip>,
}

impl Report {
    /// Records that fused node `node` of `graph` now takes the 3D layout (fuse::layout), with
    /// the head split/merge nodes it absorbed.
    pub fn note_folded(&mut self, graph: &str, node: &str, folded: &[String]) {
        let site = self
            .sites
            .iter_mut()
            .find(|s| s.graph == graph && s.fused_node.as_deref() == Some(node));
        if let Some(site) = site {
            site.replaced.extend(folded.iter().cloned());
            if let Some(summary) = site.summary.as_mut() {
                summary.layout = "BSD (head split/merge transposes folded in)".into();
            }
        }
    }
}

impl SiteReport {
    pub fn fused(graph: &str, kind: &'static str, v: &GraphView, anchor: usize, p: &Plan) -> Self {
        SiteReport {
            graph: graph.into(),
            kind,
            anchor: node_label(v.node(anchor)),
            status: "fused",
            replaced: p.remove.iter().map(|&i| node_label(v.node(i))).collect(),
            fused_node: p.new_nodes.last().and_then(|n| n.name.clone()),
            summary: Some(p.summary.clone()),
            reason: None,
        }
    }

    pub fn skipped(graph: &str, kind: &'static str, anchor: String, reason: Skip) -> Self {
        SiteReport {
            graph: graph.into(),
            kind,
            anchor,
            status: "skipped",
            replaced: vec![],
            fused_node: None,
            summary: None,
            reason: Some(reason),
        }
    }
}

impl Report {
    /// A few lines for stdout.
    pub fn human(&self) -> String {
        let mut s = String::new();
        for site in &self.sites {
            match (&site.summary, &site.reason) {
                (Some(sum), _) => {
                    let mut extra = Vec::new();
                    if let Some(sc) = sum.scale {
                        extra.push(format!("scale={sc}"));
                    }
                    if sum.is_causal {
                        extra.push("causal".into());
                    }
                    if let Some(c) = sum.softcap {
                        extra.push(format!("softcap={c}"));
                    }
                    extra.push(format!("mask={}", sum.mask));
                    if sum.gqa_folded {
                        extra.push("gqa".into());
                    }
                    s += &format!(
                        "fused    {} [{}] {} ({} nodes; {})\n",
                        site.anchor,
                        site.kind,
                        site.graph,
                        site.replaced.len(),
                        extra.join(", ")
                    );
                }
                (None, Some(r)) => {
                    s += &format!(
                        "skipped  {} [{}] {}: {}\n",
                        site.anchor, site.kind, site.graph, r
                    )
                }
                _ => {}
            }
        }
        s += &format!(
            "{} attention site(s): {} fused, {} skipped\n",
            self.sites.len(),
            self.fused,
            self.skipped
        );
        s
    }
}
