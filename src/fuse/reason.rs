//! Why a site was left alone: a stable kebab-case code, the node it concerns, and a sentence.

use serde::Serialize;

/// A check that failed. `code` values are stable: tests and users match on them.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Skip {
    pub code: &'static str,
    pub node: String,
    pub detail: String,
}

impl Skip {
    pub fn new(code: &'static str, node: impl Into<String>, detail: impl Into<String>) -> Self {
        Skip {
            code,
            node: node.into(),
            detail: detail.into(),
        }
    }
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at {}: {}", self.code, self.node, self.detail)
    }
}

/// Every reason code the matcher can give, with what it means (printed by `inspect --codes`).
pub const CODES: &[(&str, &str)] = &[
    ("softmax-not-last-axis", "the Softmax normalizes over an axis other than the last"),
    ("rank-unknown", "a tensor's rank could not be inferred, so the layout cannot be proven"),
    ("rank-unsupported", "Q, K or V is not a rank-4 [B, H, S, D] tensor"),
    ("no-score-matmul", "no MatMul produces the Softmax input through scale/mask/softcap ops"),
    ("score-op-unsupported", "an op between the score MatMul and the Softmax has no attention meaning"),
    ("score-path-ambiguous", "both inputs of an Add/Where on the score path come from a MatMul"),
    ("scale-not-constant", "a factor on the Q, K or score path is not a constant scalar"),
    ("mask-before-scale", "a mask or bias is applied before a scale factor or softcap, so it would be scaled too"),
    ("softcap-unrecognized", "a Tanh on the score path is not softcap·tanh(x/softcap)"),
    ("mask-fill-not-negative", "a Where on the score path does not fill with a large negative constant"),
    ("mask-not-broadcastable", "the mask does not broadcast to [B, Hq, Sq, Skv]"),
    ("mask-dtype-mismatch", "a float mask's type differs from Q's"),
    ("k-transpose-unrecognized", "K reaches the score MatMul through something other than a proven transpose"),
    ("pv-matmul-missing", "the Softmax output does not reach a MatMul with V"),
    ("pv-order-unexpected", "the probabilities are the second operand of the output MatMul"),
    ("intermediate-has-other-consumers", "a tensor inside the site is also read outside it"),
    ("intermediate-is-graph-output", "a tensor inside the site is a graph output"),
    ("dropout-in-training", "a Dropout inside the site may be in training mode with a non-zero ratio"),
    ("dtype-unsupported", "Q/K/V are not float, float16 or bfloat16, or their types differ"),
    ("head-dim-mismatch", "Q and K have different head dims"),
    ("heads-not-divisible", "the query head count is not a multiple of the key/value head count"),
    ("batch-mismatch", "Q, K and V batch dims are not proven equal"),
    ("qk-output-used", "the ONNX Attention node's qk_matmul_output is used"),
    ("causal-alignment-ambiguous", "is_causal with query and key lengths that may differ (ORT aligns top-left, FlashAttention bottom-right)"),
    ("optional-input-gap", "an optional input is omitted before a present one (ORT 1.20–1.23 cannot load that) and no neutral value can be built"),
    ("node-claimed", "a node of this site already belongs to another fused site"),
];
