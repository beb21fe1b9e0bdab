//! The report of one run: every site, fused (with what the fused node does) or skipped (with
//! the reason code, the node and a sentence). Printed for humans and written as JSON.

use serde::Serialize;

use super::plan::{Plan, QkvPack, Summary};
use super::reason::Skip;
use crate::graph::view::{node_label, GraphView};

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub fused: usize,
    pub skipped: usize,
    /// Fused sites whose Q, K and V projections were packed into one MatMul.
    pub qkv_packed: usize,
    /// Fused sites whose K/V bias Adds were removed (fuse::bias_fold).
    pub bias_folded: usize,
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
    /// The site whose fused node is `node` in `graph`.
    fn site_of(&mut self, graph: &str, node: &str) -> Option<&mut SiteReport> {
        self.sites
            .iter_mut()
            .find(|s| s.graph == graph && s.fused_node.as_deref() == Some(node))
    }

    /// Records that fused node `node` of `graph` now takes the 3D layout (fuse::layout), with
    /// the head split/merge nodes it absorbed and those left for their other readers.
    pub fn note_folded(&mut self, graph: &str, node: &str, folded: &[String], kept: &[String]) {
        let Some(site) = self.site_of(graph, node) else {
            return;
        };
        site.replaced.extend(folded.iter().cloned());
        if let Some(summary) = site.summary.as_mut() {
            summary.layout = "BSD (head split/merge transposes folded in)".into();
            summary.layout_note = (!kept.is_empty())
                .then(|| format!("kept for their other readers: {}", kept.join(", ")));
        }
    }

    /// Records why fused node `node` of `graph` keeps the 4D layout. Nodes of another layout
    /// (ONNX Attention on 3D inputs, 3D-batched sites) were never candidates: no note.
    pub fn note_unfolded(&mut self, graph: &str, node: &str, reason: &str) {
        let summary = self
            .site_of(graph, node)
            .and_then(|s| s.summary.as_mut())
            .filter(|s| s.layout == "BHSD");
        if let Some(summary) = summary {
            summary.layout_note = Some(reason.to_string());
        }
    }
}

impl Report {
    fn note_pack(&mut self, graph: &str, node: &str, pack: QkvPack) {
        let packed = pack.packed;
        if let Some(summary) = self.site_of(graph, node).and_then(|s| s.summary.as_mut()) {
            summary.qkv_pack = Some(pack);
            self.qkv_packed += usize::from(packed);
        }
    }

    /// Records the bias Adds fuse::bias_fold removed around fused node `node` of `graph`.
    pub fn note_bias_fold(&mut self, graph: &str, node: &str, note: &str) {
        if let Some(summary) = self.site_of(graph, node).and_then(|s| s.summary.as_mut()) {
            summary.bias_fold = Some(note.to_string());
            self.bias_folded += 1;
        }
    }

    /// Adds `note` to the mask description of fused node `node` of `graph`.
    pub fn note_mask(&mut self, graph: &str, node: &str, note: &str) {
        if let Some(summary) = self.site_of(graph, node).and_then(|s| s.summary.as_mut()) {
            summary.mask = format!("{}; {note}", summary.mask);
        }
    }

    /// Records that fused node `node` of `graph` reads Q, K and V from one packed MatMul.
    pub fn note_packed(&mut self, graph: &str, node: &str, note: &str) {
        let pack = QkvPack {
            packed: true,
            reason: None,
            note: note.into(),
        };
        self.note_pack(graph, node, pack);
    }

    /// Records why fused node `node` of `graph` keeps its projections apart.
    pub fn note_unpacked(&mut self, graph: &str, node: &str, code: &'static str, detail: &str) {
        let pack = QkvPack {
            packed: false,
            reason: Some(code),
            note: detail.into(),
        };
        self.note_pack(graph, node, pack);
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
                    if sum.bias_fold.is_some() {
                        extra.push("k/v bias folded".into());
                    }
                    match &sum.qkv_pack {
                        Some(p) if p.packed => extra.push("qkv packed".into()),
                        Some(p) => {
                            extra.push(format!("qkv not packed: {}", p.reason.unwrap_or("?")))
                        }
                        None => {}
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
            "{} attention site(s): {} fused, {} skipped",
            self.sites.len(),
            self.fused,
            self.skipped
        );
        if self.qkv_packed > 0 {
            s += &format!(
                "; {} with Q/K/V projections packed into one MatMul",
                self.qkv_packed
            );
        }
        if self.bias_folded > 0 {
            s += &format!("; {} with K/V bias Adds folded away", self.bias_folded);
        }
        s += "\n";
        s
    }
}
