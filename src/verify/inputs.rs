//! Generated inputs that respect what each graph input means: token ids inside the vocabulary
//! (read from the embedding table the ids index), attention masks with right padding (row b has
//! b fewer real tokens, never zero), key lengths (`*seqlen`) S − b, position ids 0..S, token types
//! 0, floats uniform in [-1, 1].

use std::collections::HashMap;

use crate::graph::onnx::{tensor_proto::DataType, type_proto, GraphProto, ModelProto};
use crate::graph::view::is_op;
use crate::{Error, Result};

/// One generated input: name, ONNX element type, shape and values (as f64, cast on use).
#[derive(Clone, Debug)]
pub struct InputData {
    pub name: String,
    pub elem: i32,
    pub shape: Vec<i64>,
    pub values: Vec<f64>,
}

/// Sizes for symbolic dims: `batch` (or `B`, `N`) → 2, names with `past` → 3, `decoder` or
/// `target` lengths → seq − 2, other symbols (sequence
/// lengths) → `seq`; unnamed dynamic dims → 1.
#[derive(Clone, Debug)]
pub struct Dims {
    pub batch: i64,
    pub seq: i64,
    pub past: i64,
}

impl Default for Dims {
    fn default() -> Self {
        Dims {
            batch: 2,
            seq: 7,
            past: 3,
        }
    }
}

/// Small deterministic generator (xorshift64*), so runs are reproducible without a dependency.
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Vocabulary size for an integer input: the smallest first dim of an initializer that a Gather
/// indexes with it (directly or through Cast/Unsqueeze/Reshape).
fn vocab_of(g: &GraphProto, input: &str) -> Option<i64> {
    let inits: HashMap<&str, i64> = g
        .initializer
        .iter()
        .filter_map(|t| Some((t.name.as_deref()?, *t.dims.first()?)))
        .collect();
    let mut names = vec![input.to_string()];
    let mut best: Option<i64> = None;
    for _ in 0..4 {
        let mut next = Vec::new();
        for n in &g.node {
            if !n.input.iter().any(|i| names.contains(i)) {
                continue;
            }
            if is_op(n, "Gather") && n.input.get(1).is_some_and(|i| names.contains(i)) {
                if let Some(&v) = n.input.first().and_then(|d| inits.get(d.as_str())) {
                    best = Some(best.map_or(v, |b| b.min(v)));
                }
            } else if is_op(n, "Cast")
                || is_op(n, "Unsqueeze")
                || is_op(n, "Reshape")
                || is_op(n, "Flatten")
            {
                next.extend(n.output.iter().cloned());
            }
        }
        names = next;
        if names.is_empty() {
            break;
        }
    }
    best
}

/// Inputs for every graph input that is not an initializer.
pub fn generate(model: &ModelProto, dims: &Dims, seed: u64) -> Result<Vec<InputData>> {
    let g = model
        .graph
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("model has no graph".into()))?;
    let inits: std::collections::HashSet<&str> = g
        .initializer
        .iter()
        .filter_map(|t| t.name.as_deref())
        .collect();
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    for vi in &g.input {
        let name = vi.name.clone().unwrap_or_default();
        if inits.contains(name.as_str()) {
            continue;
        }
        let Some(type_proto::Value::TensorType(tt)) =
            vi.r#type.as_ref().and_then(|t| t.value.as_ref())
        else {
            return Err(Error::NotImplemented(format!(
                "input '{name}' is not a tensor"
            )));
        };
        let elem = tt.elem_type.unwrap_or(0);
        let shape: Vec<i64> = tt
            .shape
            .as_ref()
            .map(|s| {
                s.dim
                    .iter()
                    .map(|d| {
                        use crate::graph::onnx::tensor_shape_proto::dimension::Value;
                        match &d.value {
                            Some(Value::DimValue(v)) => *v,
                            Some(Value::DimParam(p)) => {
                                let p = p.to_lowercase();
                                if p.contains("batch") || p == "b" || p == "n" {
                                    dims.batch
                                } else if p.contains("decoder") || p.contains("target") {
                                    // Differs from the encoder length so cross attention has Skv ≠ Sq.
                                    (dims.seq - 2).max(1)
                                } else if p.contains("past") || p.contains("cache") {
                                    dims.past
                                } else if p.contains("total") || p.contains("all") {
                                    dims.past + dims.seq
                                } else {
                                    dims.seq
                                }
                            }
                            None => 1,
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let n: usize = shape.iter().map(|&d| d.max(0) as usize).product();
        if n > 1 << 26 {
            return Err(Error::InvalidArgument(format!(
                "input '{name}' would have {n} elements"
            )));
        }
        let lname = name.to_lowercase();
        let is_int = elem != DataType::Float as i32
            && elem != DataType::Float16 as i32
            && elem != DataType::Bfloat16 as i32
            && elem != DataType::Double as i32;
        let last = *shape.last().unwrap_or(&1);
        let values: Vec<f64> = if lname.contains("mask") {
            // Right padding: row r of the batch keeps max(1, L - r) positions.
            let rows = if shape.len() >= 2 {
                n / last.max(1) as usize
            } else {
                1
            };
            let l = if shape.is_empty() {
                1
            } else {
                last.max(1) as usize
            };
            (0..rows.max(1))
                .flat_map(|r| {
                    let keep = l
                        .saturating_sub(r % shape.first().map(|&b| b.max(1) as usize).unwrap_or(1))
                        .max(1);
                    (0..l).map(move |j| if j < keep { 1.0 } else { 0.0 })
                })
                .take(n)
                .collect()
        } else if lname.contains("seqlen") && is_int {
            // Key lengths (nonpad_kv_seqlen): row r keeps max(1, S − r) of the S keys.
            (0..n)
                .map(|r| (dims.seq - r as i64).max(1) as f64)
                .collect()
        } else if lname.contains("position") && is_int {
            (0..n).map(|i| (i % last.max(1) as usize) as f64).collect()
        } else if lname.contains("token_type") && is_int {
            vec![0.0; n]
        } else if elem == DataType::Bool as i32 {
            vec![1.0; n]
        } else if is_int {
            let vocab = vocab_of(g, &name).unwrap_or(16).max(1);
            (0..n)
                .map(|_| (rng.next_u64() % vocab as u64) as f64)
                .collect()
        } else {
            (0..n).map(|_| rng.unit() * 2.0 - 1.0).collect()
        };
        out.push(InputData {
            name,
            elem,
            shape,
            values,
        });
    }
    Ok(out)
}
