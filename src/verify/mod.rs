//! Running an original and a rewritten model in ONNX Runtime on the same generated inputs and
//! reporting the worst absolute and relative error of every output.
//!
//! Outputs laid out [B, S, …] like the generated `attention_mask` are judged on the real tokens
//! only; the padded positions are counted and their worst error printed beside the verdict. A
//! padded query under a causal mask or a sliding window may see no key at all: the operator then
//! returns zeros where the exported graph averages every value (its mask adds the dtype's min
//! everywhere), a difference no model output at a real token can see.

pub mod compare;
pub mod inputs;
pub mod runtime;

use std::path::{Path, PathBuf};

use ort::value::{DynValue, Tensor, TensorElementType, ValueType};
use serde::Serialize;

use crate::graph::onnx::tensor_proto::DataType;
use crate::{Error, Result};
pub use compare::OutputDiff;
pub use inputs::{Dims, InputData};

/// How to run the comparison.
#[derive(Clone, Debug)]
pub struct Options {
    /// Operator library to register (default: found beside the executable / in target/).
    pub op_lib: Option<PathBuf>,
    pub dims: Dims,
    pub seed: u64,
    /// Allowed max abs error for float32/float64 outputs; float16/bfloat16 get 100× this.
    pub tolerance: f64,
    pub threads: usize,
    /// The execution provider both models run on.
    pub provider: runtime::Provider,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            op_lib: None,
            dims: Dims::default(),
            seed: 0x5eed,
            tolerance: 1e-4,
            threads: 1,
            provider: runtime::Provider::Cpu,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    pub outputs: Vec<OutputDiff>,
    pub ok: bool,
}

impl VerifyReport {
    pub fn human(&self) -> String {
        let mut s = String::new();
        for o in &self.outputs {
            s += &format!(
                "{} {:<32} shape {:?}: max abs {:.3e}, max rel {:.3e} (tolerance {:.1e})\n",
                if o.ok { "ok      " } else { "MISMATCH" },
                o.name,
                o.shape,
                o.max_abs,
                o.max_rel,
                o.tolerance
            );
            if o.padded_excluded > 0 {
                s += &format!(
                    "         {} padded positions excluded (attention_mask = 0; max abs there {:.3e})\n",
                    o.padded_excluded, o.padded_max_abs
                );
            }
        }
        s
    }
}

fn to_value(d: &InputData) -> Result<DynValue> {
    let shape = d.shape.clone();
    let err = |e: ort::Error| Error::Other(format!("input '{}': {e}", d.name));
    let v: DynValue = match DataType::try_from(d.elem).unwrap_or(DataType::Undefined) {
        DataType::Float => Tensor::from_array((
            shape,
            d.values.iter().map(|&x| x as f32).collect::<Vec<_>>(),
        ))
        .map_err(err)?
        .into_dyn(),
        DataType::Double => Tensor::from_array((shape, d.values.clone()))
            .map_err(err)?
            .into_dyn(),
        DataType::Float16 => Tensor::from_array((
            shape,
            d.values
                .iter()
                .map(|&x| half::f16::from_f64(x))
                .collect::<Vec<_>>(),
        ))
        .map_err(err)?
        .into_dyn(),
        DataType::Bfloat16 => Tensor::from_array((
            shape,
            d.values
                .iter()
                .map(|&x| half::bf16::from_f64(x))
                .collect::<Vec<_>>(),
        ))
        .map_err(err)?
        .into_dyn(),
        DataType::Int64 => Tensor::from_array((
            shape,
            d.values.iter().map(|&x| x as i64).collect::<Vec<_>>(),
        ))
        .map_err(err)?
        .into_dyn(),
        DataType::Int32 => Tensor::from_array((
            shape,
            d.values.iter().map(|&x| x as i32).collect::<Vec<_>>(),
        ))
        .map_err(err)?
        .into_dyn(),
        DataType::Bool => Tensor::from_array((
            shape,
            d.values.iter().map(|&x| x != 0.0).collect::<Vec<_>>(),
        ))
        .map_err(err)?
        .into_dyn(),
        DataType::Uint8 => {
            Tensor::from_array((shape, d.values.iter().map(|&x| x as u8).collect::<Vec<_>>()))
                .map_err(err)?
                .into_dyn()
        }
        other => {
            return Err(Error::NotImplemented(format!(
                "input '{}' has type {other:?}, which verify cannot generate",
                d.name
            )))
        }
    };
    Ok(v)
}

/// An output as f64 values, its shape and whether it is a low-precision float.
fn from_value(name: &str, v: &DynValue) -> Result<(Vec<i64>, Vec<f64>, bool)> {
    let ValueType::Tensor { ty, .. } = v.dtype() else {
        return Err(Error::NotImplemented(format!(
            "output '{name}' is not a tensor"
        )));
    };
    let err = |e: ort::Error| Error::Other(format!("output '{name}': {e}"));
    macro_rules! get {
        ($t:ty, $f:expr) => {{
            let (s, d) = v.try_extract_tensor::<$t>().map_err(err)?;
            (s.to_vec(), d.iter().map($f).collect::<Vec<f64>>())
        }};
    }
    let (shape, vals, low) = match ty {
        TensorElementType::Float32 => {
            let (s, d) = get!(f32, |&x| x as f64);
            (s, d, false)
        }
        TensorElementType::Float64 => {
            let (s, d) = get!(f64, |&x| x);
            (s, d, false)
        }
        TensorElementType::Float16 => {
            let (s, d) = get!(half::f16, |x| x.to_f64());
            (s, d, true)
        }
        TensorElementType::Bfloat16 => {
            let (s, d) = get!(half::bf16, |x| x.to_f64());
            (s, d, true)
        }
        TensorElementType::Int64 => {
            let (s, d) = get!(i64, |&x| x as f64);
            (s, d, false)
        }
        TensorElementType::Int32 => {
            let (s, d) = get!(i32, |&x| x as f64);
            (s, d, false)
        }
        TensorElementType::Bool => {
            let (s, d) = get!(bool, |&x| if x { 1.0 } else { 0.0 });
            (s, d, false)
        }
        other => {
            return Err(Error::NotImplemented(format!(
                "output '{name}' has type {other:?}"
            )))
        }
    };
    Ok((shape, vals, low))
}

/// One output of a run: name, shape, values as f64, and whether it is float16/bfloat16.
pub type RunOutput = (String, Vec<i64>, Vec<f64>, bool);

/// Runs `model` on `inputs` (CPU EP) and returns each output.
pub fn run_model(
    model: &Path,
    inputs: &[InputData],
    op_lib: Option<&Path>,
    threads: usize,
) -> Result<Vec<RunOutput>> {
    run_model_on(model, inputs, op_lib, threads, runtime::Provider::Cpu)
}

/// Runs `model` on `inputs` on `provider` and returns each output.
pub fn run_model_on(
    model: &Path,
    inputs: &[InputData],
    op_lib: Option<&Path>,
    threads: usize,
    provider: runtime::Provider,
) -> Result<Vec<RunOutput>> {
    let mut session = runtime::open_session_on(model, op_lib, threads, provider)?;
    let mut feed: Vec<(String, DynValue)> = Vec::new();
    for d in inputs {
        feed.push((d.name.clone(), to_value(d)?));
    }
    let names: Vec<String> = session
        .outputs()
        .iter()
        .map(|o| o.name().to_string())
        .collect();
    let outs = session
        .run(feed)
        .map_err(|e| Error::Other(format!("running {}: {e}", model.display())))?;
    let mut res = Vec::new();
    for n in names {
        let v = outs
            .get(&n)
            .ok_or_else(|| Error::Other(format!("output '{n}' missing")))?;
        let (s, d, low) = from_value(&n, v)?;
        res.push((n, s, d, low));
    }
    Ok(res)
}

/// Runs `a` and `b` on the same inputs (generated from `a`'s inputs) and compares every output
/// by name.
pub fn verify(a: &Path, b: &Path, opts: &Options) -> Result<VerifyReport> {
    let loaded = crate::graph::load_model(a)?;
    let inputs = inputs::generate(&loaded.model, &opts.dims, opts.seed)?;
    let op_lib = opts.op_lib.clone().or_else(runtime::find_operator_library);
    let ra = run_model_on(a, &inputs, op_lib.as_deref(), opts.threads, opts.provider)?;
    let rb = run_model_on(b, &inputs, op_lib.as_deref(), opts.threads, opts.provider)?;
    // Padded positions: attention_mask = 0 in the generated [B, S] mask.
    let padding = inputs
        .iter()
        .find(|d| d.name.to_lowercase().contains("attention_mask") && d.shape.len() == 2)
        .map(|d| {
            (
                d.shape.clone(),
                d.values.iter().map(|&x| x == 0.0).collect::<Vec<bool>>(),
            )
        });
    let mut outputs = Vec::new();
    for (name, shape, va, low) in &ra {
        let padded = padding
            .as_ref()
            .filter(|(ps, _)| shape.len() >= 3 && shape[..2] == ps[..])
            .map(|(_, p)| p.as_slice());
        let tol = if *low {
            opts.tolerance * 100.0
        } else {
            opts.tolerance
        };
        let d = match rb.iter().find(|o| &o.0 == name) {
            Some((_, sb, vb, _)) if sb == shape => {
                compare::diff_unpadded(name, shape, va, vb, tol, padded)
            }
            Some(_) | None => compare::diff(name, shape, va, &[], tol),
        };
        outputs.push(d);
    }
    let ok = outputs.iter().all(|o| o.ok) && ra.len() == rb.len();
    Ok(VerifyReport { outputs, ok })
}
