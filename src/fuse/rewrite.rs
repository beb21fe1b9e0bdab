//! Applying checked plans to a graph: drop each site's nodes, put its new nodes where its last
//! node was, then remove what only the dropped nodes used (scale computations, mask builders,
//! constants) — and nothing else.

use std::collections::{HashMap, HashSet};

use super::plan::Plan;
use crate::graph::onnx::{GraphProto, NodeProto};

/// Every tensor `n` reads, its subgraphs' reads from the outer scope included.
pub(super) fn reads(n: &NodeProto, out: &mut HashSet<String>) {
    out.extend(n.input.iter().filter(|s| !s.is_empty()).cloned());
    for a in &n.attribute {
        for g in a.g.iter().chain(a.graphs.iter()) {
            for sub in &g.node {
                reads(sub, out);
            }
        }
    }
}

/// Drops the initializers among `candidates` (what removed or rewired nodes used to read) that
/// nothing reads any more and that are no graph input or output.
pub(super) fn drop_unread_initializers(g: &mut GraphProto, candidates: &HashSet<String>) {
    let mut used = HashSet::new();
    for n in &g.node {
        reads(n, &mut used);
    }
    let io: HashSet<&str> = g
        .input
        .iter()
        .chain(&g.output)
        .filter_map(|t| t.name.as_deref())
        .collect();
    g.initializer.retain(|t| {
        let name = t.name.as_deref().unwrap_or("");
        !candidates.contains(name) || used.contains(name) || io.contains(name)
    });
}

pub fn apply(g: &mut GraphProto, plans: &[Plan]) {
    // The anchor (whose outputs the fused node now produces) goes at once; the site's other
    // nodes become dead-code candidates, removed below only when nothing reads them any more
    // (a Shape reader elsewhere may keep one alive, which is correct, just not faster).
    let anchors: HashSet<usize> = plans.iter().map(|p| p.anchor).collect();
    let inserts: HashMap<usize, &Vec<NodeProto>> =
        plans.iter().map(|p| (p.anchor, &p.new_nodes)).collect();
    let site_nodes: HashSet<usize> = plans
        .iter()
        .flat_map(|p| p.remove.iter().copied())
        .collect();
    let mut candidates: HashSet<String> = HashSet::new();
    let old = std::mem::take(&mut g.node);
    for (i, n) in old.into_iter().enumerate() {
        if let Some(new) = inserts.get(&i) {
            g.node.extend(new.iter().cloned());
        }
        if anchors.contains(&i) {
            candidates.extend(n.input.iter().filter(|s| !s.is_empty()).cloned());
        } else {
            if site_nodes.contains(&i) {
                candidates.extend(n.output.iter().filter(|s| !s.is_empty()).cloned());
            }
            g.node.push(n);
        }
    }
    remove_dead(g, candidates);
}

/// Dead-code removal limited to `candidates` (tensors that removed or rewired nodes read) and,
/// transitively, what the nodes removed here read; then the initializers and value_info entries
/// nothing refers to any more.
pub(super) fn remove_dead(g: &mut GraphProto, mut candidates: HashSet<String>) {
    let outputs: HashSet<String> = g.output.iter().filter_map(|o| o.name.clone()).collect();
    loop {
        let mut used = HashSet::new();
        for n in &g.node {
            reads(n, &mut used);
        }
        let dead: Vec<usize> = g
            .node
            .iter()
            .enumerate()
            .filter(|(_, n)| {
                n.output.iter().any(|o| candidates.contains(o))
                    && n.output
                        .iter()
                        .all(|o| o.is_empty() || (!used.contains(o) && !outputs.contains(o)))
            })
            .map(|(i, _)| i)
            .collect();
        if dead.is_empty() {
            break;
        }
        for &i in dead.iter().rev() {
            let n = g.node.remove(i);
            candidates.extend(n.input.into_iter().filter(|s| !s.is_empty()));
        }
    }
    let mut used = HashSet::new();
    for n in &g.node {
        reads(n, &mut used);
    }
    let inputs: HashSet<String> = g.input.iter().filter_map(|o| o.name.clone()).collect();
    g.initializer.retain(|t| {
        let name = t.name.as_deref().unwrap_or("");
        !candidates.contains(name)
            || used.contains(name)
            || outputs.contains(name)
            || inputs.contains(name)
    });
    let produced: HashSet<&str> = g
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(String::as_str))
        .collect();
    let live: HashSet<String> = produced.iter().map(|s| s.to_string()).collect();
    g.value_info.retain(|vi| {
        vi.name
            .as_deref()
            .is_some_and(|n| live.contains(n) || used.contains(n))
    });
}
