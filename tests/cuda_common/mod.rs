//! Shared GPU harness for the CUDA tests and the CUDA bench: random problems, device buffers
//! through `cudarc`, the fp64 oracle (whole problem or sampled rows) and the comparison.
#![allow(dead_code)]

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use flash_ort::attention::{
    self, reference, AttentionAttrs, AttentionProblem, CpuInputs, DType, ElemType, Elems,
    InputDescs, MaskData, TensorDesc,
};
use flash_ort::cuda::{self, DevicePtrs};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::Rng;

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
}

/// The GPU, or None (with a note) on a machine without one: the tests then pass vacuously.
pub fn gpu() -> Option<Gpu> {
    if cuda::device_count() == 0 {
        eprintln!("no CUDA device: skipping GPU checks");
        return None;
    }
    let ctx = CudaContext::new(0).expect("CUDA context");
    let stream = ctx.new_stream().expect("CUDA stream");
    Some(Gpu { ctx, stream })
}

/// Mask given to a case: element type and its (broadcastable) shape.
#[derive(Clone, Debug)]
pub enum MaskSpec {
    None,
    Bool(Vec<i64>),
    Add(ElemType, Vec<i64>),
}

#[derive(Clone, Debug)]
pub struct Case {
    pub dtype: DType,
    pub four_d: bool,
    pub b: usize,
    pub hq: usize,
    pub hkv: usize,
    pub sq: usize,
    pub skv: usize,
    pub past: usize,
    pub d: usize,
    pub dv: usize,
    pub causal: bool,
    pub window_left: i64,
    pub window_right: i64,
    pub softcap: f32,
    pub scale: Option<f32>,
    pub mask: MaskSpec,
    pub nonpad: bool,
    /// Check only this many random rows against the oracle (big problems).
    pub sample_rows: Option<usize>,
}

impl Case {
    pub fn plain(
        dtype: DType,
        b: usize,
        hq: usize,
        hkv: usize,
        sq: usize,
        skv: usize,
        d: usize,
    ) -> Case {
        Case {
            dtype,
            four_d: true,
            b,
            hq,
            hkv,
            sq,
            skv,
            past: 0,
            d,
            dv: d,
            causal: false,
            window_left: -1,
            window_right: -1,
            softcap: 0.0,
            scale: None,
            mask: MaskSpec::None,
            nonpad: false,
            sample_rows: None,
        }
    }

    pub fn attrs(&self) -> AttentionAttrs {
        AttentionAttrs {
            is_causal: self.causal,
            scale: self.scale,
            q_num_heads: (!self.four_d).then_some(self.hq),
            kv_num_heads: (!self.four_d).then_some(self.hkv),
            softcap: self.softcap,
            window_left: self.window_left,
            window_right: self.window_right,
        }
    }

    fn elem(&self) -> ElemType {
        match self.dtype {
            DType::F32 => ElemType::F32,
            DType::F16 => ElemType::F16,
            DType::BF16 => ElemType::BF16,
        }
    }

    pub fn descs(&self) -> InputDescs {
        let e = self.elem();
        let (b, s, kv) = (self.b as i64, self.sq as i64, self.skv as i64);
        let shape = |h: usize, len: i64, d: usize| -> Vec<i64> {
            if self.four_d {
                vec![b, h as i64, len, d as i64]
            } else {
                vec![b, len, (h * d) as i64]
            }
        };
        let past = (self.past > 0).then(|| {
            (
                TensorDesc::new(e, &[b, self.hkv as i64, self.past as i64, self.d as i64]),
                TensorDesc::new(e, &[b, self.hkv as i64, self.past as i64, self.dv as i64]),
            )
        });
        InputDescs {
            q: Some(TensorDesc::new(e, &shape(self.hq, s, self.d))),
            k: Some(TensorDesc::new(e, &shape(self.hkv, kv, self.d))),
            v: Some(TensorDesc::new(e, &shape(self.hkv, kv, self.dv))),
            attn_mask: match &self.mask {
                MaskSpec::None => None,
                MaskSpec::Bool(sh) => Some(TensorDesc::new(ElemType::Bool, sh)),
                MaskSpec::Add(t, sh) => Some(TensorDesc::new(*t, sh)),
            },
            past_key: past.as_ref().map(|p| p.0.clone()),
            past_value: past.as_ref().map(|p| p.1.clone()),
            nonpad_kv_seqlen: self.nonpad.then(|| TensorDesc::new(ElemType::I64, &[b])),
        }
    }

    pub fn describe(&self) -> String {
        format!("{self:?}")
    }
}

/// Host tensor in a problem dtype, kept as f32 values already rounded to that dtype.
#[derive(Clone)]
pub struct HostTensor {
    pub dtype: DType,
    pub f16: Vec<f16>,
    pub bf16: Vec<bf16>,
    pub f32: Vec<f32>,
}

impl HostTensor {
    pub fn random(dtype: DType, n: usize, rng: &mut StdRng) -> HostTensor {
        let vals: Vec<f32> = (0..n).map(|_| normal(rng)).collect();
        HostTensor::from_f32(dtype, &vals)
    }
    pub fn from_f32(dtype: DType, vals: &[f32]) -> HostTensor {
        let mut t = HostTensor {
            dtype,
            f16: vec![],
            bf16: vec![],
            f32: vec![],
        };
        match dtype {
            DType::F16 => t.f16 = vals.iter().map(|&x| f16::from_f32(x)).collect(),
            DType::BF16 => t.bf16 = vals.iter().map(|&x| bf16::from_f32(x)).collect(),
            DType::F32 => t.f32 = vals.to_vec(),
        }
        t
    }
    pub fn elems(&self) -> Elems<'_> {
        match self.dtype {
            DType::F16 => Elems::F16(&self.f16),
            DType::BF16 => Elems::BF16(&self.bf16),
            DType::F32 => Elems::F32(&self.f32),
        }
    }
    pub fn bytes(&self) -> Vec<u8> {
        match self.dtype {
            DType::F16 => self
                .f16
                .iter()
                .flat_map(|x| x.to_bits().to_le_bytes())
                .collect(),
            DType::BF16 => self
                .bf16
                .iter()
                .flat_map(|x| x.to_bits().to_le_bytes())
                .collect(),
            DType::F32 => self.f32.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

pub fn normal(rng: &mut StdRng) -> f32 {
    // Box-Muller: a standard normal without another dependency.
    let u1: f32 = rng.random_range(1e-7f32..1.0);
    let u2: f32 = rng.random::<f32>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

pub enum HostMask {
    Bool(Vec<u8>),
    F32(Vec<f32>),
    Half(HostTensor),
}

impl HostMask {
    pub fn data(&self) -> MaskData<'_> {
        match self {
            HostMask::Bool(m) => MaskData::Bool(m),
            HostMask::F32(m) => MaskData::F32(m),
            HostMask::Half(t) => match t.dtype {
                DType::F16 => MaskData::F16(&t.f16),
                _ => MaskData::BF16(&t.bf16),
            },
        }
    }
    pub fn bytes(&self) -> Vec<u8> {
        match self {
            HostMask::Bool(m) => m.clone(),
            HostMask::F32(m) => m.iter().flat_map(|x| x.to_le_bytes()).collect(),
            HostMask::Half(t) => t.bytes(),
        }
    }
}

/// All host inputs of one case, plus the validated problem.
pub struct Inputs {
    pub p: AttentionProblem,
    pub q: HostTensor,
    pub k: HostTensor,
    pub v: HostTensor,
    pub past_k: Option<HostTensor>,
    pub past_v: Option<HostTensor>,
    pub mask: Option<HostMask>,
    pub nonpad: Option<Vec<i64>>,
}

pub fn make_inputs(c: &Case, rng: &mut StdRng) -> Inputs {
    let p = attention::validate(&c.attrs(), &c.descs()).expect("valid case");
    let n = |dims: [usize; 4]| dims.iter().product::<usize>();
    let q = HostTensor::random(c.dtype, n([c.b, c.hq, c.sq, c.d]), rng);
    let k = HostTensor::random(c.dtype, n([c.b, c.hkv, c.skv, c.d]), rng);
    let v = HostTensor::random(c.dtype, n([c.b, c.hkv, c.skv, c.dv]), rng);
    let (past_k, past_v) = if c.past > 0 {
        (
            Some(HostTensor::random(
                c.dtype,
                n([c.b, c.hkv, c.past, c.d]),
                rng,
            )),
            Some(HostTensor::random(
                c.dtype,
                n([c.b, c.hkv, c.past, c.dv]),
                rng,
            )),
        )
    } else {
        (None, None)
    };
    let mask = p.mask.as_ref().map(|m| match &c.mask {
        MaskSpec::Bool(_) => {
            HostMask::Bool((0..m.len).map(|_| rng.random_bool(0.8) as u8).collect())
        }
        MaskSpec::Add(t, _) => {
            let vals: Vec<f32> = (0..m.len)
                .map(|_| {
                    if rng.random_bool(0.1) {
                        f32::NEG_INFINITY
                    } else {
                        rng.random_range(-3.0f32..1.0)
                    }
                })
                .collect();
            match t {
                ElemType::F32 => HostMask::F32(vals),
                ElemType::F16 => HostMask::Half(HostTensor::from_f32(DType::F16, &vals)),
                _ => HostMask::Half(HostTensor::from_f32(DType::BF16, &vals)),
            }
        }
        MaskSpec::None => unreachable!(),
    });
    let nonpad = c.nonpad.then(|| {
        (0..c.b)
            .map(|_| rng.random_range(0..=p.kv_len as i64))
            .collect()
    });
    Inputs {
        p,
        q,
        k,
        v,
        past_k,
        past_v,
        mask,
        nonpad,
    }
}

/// Host-side present K/V (past ++ new), dense `[B, Hkv, kv_len, dim]`.
pub fn host_present(inp: &Inputs, key: bool) -> HostTensor {
    let p = &inp.p;
    let (past, new, dim, strides) = if key {
        (&inp.past_k, &inp.k, p.head_dim, p.k_strides)
    } else {
        (&inp.past_v, &inp.v, p.v_head_dim, p.v_strides)
    };
    let get = |t: &HostTensor, i: usize| -> f32 { t.elems().get_f32(i) };
    let mut out = vec![0f32; p.batch * p.kv_heads * p.kv_len * dim];
    for b in 0..p.batch {
        for h in 0..p.kv_heads {
            for s in 0..p.kv_len {
                for d in 0..dim {
                    let v = if s < p.past_len {
                        get(
                            past.as_ref().unwrap(),
                            ((b * p.kv_heads + h) * p.past_len + s) * dim + d,
                        )
                    } else {
                        let s2 = s - p.past_len;
                        get(
                            new,
                            b * strides[0] + h * strides[1] + s2 * strides[2] + d * strides[3],
                        )
                    };
                    out[((b * p.kv_heads + h) * p.kv_len + s) * dim + d] = v;
                }
            }
        }
    }
    HostTensor::from_f32(p.dtype, &out)
}

/// Device copies of one case's inputs.
pub struct DevInputs {
    pub q: CudaSlice<u8>,
    pub k: CudaSlice<u8>,
    pub v: CudaSlice<u8>,
    pub past_k: Option<CudaSlice<u8>>,
    pub past_v: Option<CudaSlice<u8>>,
    pub present_k: Option<CudaSlice<u8>>,
    pub present_v: Option<CudaSlice<u8>>,
    pub mask: Option<CudaSlice<u8>>,
    pub nonpad: Option<CudaSlice<i64>>,
    pub out: CudaSlice<u8>,
    pub scratch: CudaSlice<u8>,
}

pub fn poison(dtype: DType, n: usize) -> Vec<u8> {
    match dtype {
        DType::F16 => (0..n).flat_map(|_| 0x7e00u16.to_le_bytes()).collect(),
        DType::BF16 => (0..n).flat_map(|_| 0x7fc0u16.to_le_bytes()).collect(),
        DType::F32 => (0..n).flat_map(|_| f32::NAN.to_le_bytes()).collect(),
    }
}

pub fn out_len(p: &AttentionProblem) -> usize {
    p.batch * p.q_heads * p.q_len * p.v_head_dim
}

pub fn upload(g: &Gpu, inp: &Inputs) -> DevInputs {
    let s = &g.stream;
    let p = &inp.p;
    let up = |b: Vec<u8>| {
        s.clone_htod(&if b.is_empty() { vec![0u8; 16] } else { b })
            .unwrap()
    };
    let es = p.dtype.size_of();
    let present = |dim: usize| up(vec![0u8; p.batch * p.kv_heads * p.kv_len * dim * es]);
    let scratch_len = cuda::scratch_bytes(p, 0).expect("scratch_bytes");
    DevInputs {
        q: up(inp.q.bytes()),
        k: up(inp.k.bytes()),
        v: up(inp.v.bytes()),
        past_k: inp.past_k.as_ref().map(|t| up(t.bytes())),
        past_v: inp.past_v.as_ref().map(|t| up(t.bytes())),
        present_k: p.has_past.then(|| present(p.head_dim)),
        present_v: p.has_past.then(|| present(p.v_head_dim)),
        mask: inp.mask.as_ref().map(|m| up(m.bytes())),
        nonpad: inp.nonpad.as_ref().map(|n| s.clone_htod(n).unwrap()),
        out: up(poison(p.dtype, out_len(p).max(1))),
        scratch: up(vec![0u8; scratch_len.max(16)]),
    }
}

fn ptr<T>(s: &Arc<CudaStream>, b: &CudaSlice<T>) -> u64 {
    let (p, _sync) = b.device_ptr(s);
    p
}

/// Enqueues the op (concat when there is a past, then attention). Returns the K/V strides used.
pub fn run(g: &Gpu, inp: &Inputs, dev: &DevInputs) -> flash_ort::Result<()> {
    let s = &g.stream;
    let p = &inp.p;
    let stream = s.cu_stream() as *mut std::ffi::c_void;
    let (k, v, ks, vs) = if p.has_past {
        let (pk, pv) = (
            dev.present_k.as_ref().unwrap(),
            dev.present_v.as_ref().unwrap(),
        );
        cuda::concat_kv(
            p,
            p.head_dim,
            ptr(s, dev.past_k.as_ref().unwrap()),
            ptr(s, &dev.k),
            p.k_strides,
            ptr(s, pk),
            stream,
            0,
        )?;
        cuda::concat_kv(
            p,
            p.v_head_dim,
            ptr(s, dev.past_v.as_ref().unwrap()),
            ptr(s, &dev.v),
            p.v_strides,
            ptr(s, pv),
            stream,
            0,
        )?;
        (
            ptr(s, pk),
            ptr(s, pv),
            p.present_strides(p.head_dim),
            p.present_strides(p.v_head_dim),
        )
    } else {
        (ptr(s, &dev.k), ptr(s, &dev.v), p.k_strides, p.v_strides)
    };
    let ptrs = DevicePtrs {
        q: ptr(s, &dev.q),
        k,
        v,
        mask: dev.mask.as_ref().map_or(0, |m| ptr(s, m)),
        nonpad_kv_seqlen: dev.nonpad.as_ref().map_or(0, |n| ptr(s, n)),
        out: ptr(s, &dev.out),
    };
    cuda::launch(
        p,
        ks,
        vs,
        &ptrs,
        ptr(s, &dev.scratch),
        dev.scratch.len(),
        stream,
        0,
    )
}

pub fn decode(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    }
}

/// The oracle's inputs: K/V with past already concatenated.
pub struct OracleKv {
    pub k: HostTensor,
    pub v: HostTensor,
}

pub fn oracle_kv(inp: &Inputs) -> OracleKv {
    if inp.p.has_past {
        OracleKv {
            k: host_present(inp, true),
            v: host_present(inp, false),
        }
    } else {
        OracleKv {
            k: inp.k.clone(),
            v: inp.v.clone(),
        }
    }
}

pub fn cpu_inputs<'a>(inp: &'a Inputs, kv: &'a OracleKv) -> CpuInputs<'a> {
    let p = &inp.p;
    let (ks, vs) = if p.has_past {
        (
            p.present_strides(p.head_dim),
            p.present_strides(p.v_head_dim),
        )
    } else {
        (p.k_strides, p.v_strides)
    };
    CpuInputs {
        q: inp.q.elems(),
        k: kv.k.elems(),
        k_strides: ks,
        v: kv.v.elems(),
        v_strides: vs,
        mask: inp.mask.as_ref().map(|m| m.data()),
        nonpad_kv_seqlen: inp.nonpad.as_deref(),
    }
}

/// fp64 oracle for one output row (b, h, i), following reference.rs's semantics via mask_term.
pub fn oracle_row(p: &AttentionProblem, ci: &CpuInputs, b: usize, h: usize, i: usize) -> Vec<f64> {
    let kvh = p.kv_head_of(h);
    let mut scores = Vec::with_capacity(p.kv_len);
    let mut max = f64::NEG_INFINITY;
    for j in 0..p.kv_len {
        let Some(add) = reference::mask_term(p, ci, b, h, i, j) else {
            continue;
        };
        let mut dot = 0.0;
        for d in 0..p.head_dim {
            let q = ci.q.get_f32(
                b * p.q_strides[0] + h * p.q_strides[1] + i * p.q_strides[2] + d * p.q_strides[3],
            );
            let k = ci.k.get_f32(
                b * ci.k_strides[0]
                    + kvh * ci.k_strides[1]
                    + j * ci.k_strides[2]
                    + d * ci.k_strides[3],
            );
            dot += q as f64 * k as f64;
        }
        let mut s = dot * p.scale as f64;
        if p.softcap > 0.0 {
            let c = p.softcap as f64;
            s = c * (s / c).tanh();
        }
        s += add;
        max = max.max(s);
        scores.push((j, s));
    }
    let mut out = vec![0.0; p.v_head_dim];
    if max == f64::NEG_INFINITY {
        return out;
    }
    let mut sum = 0.0;
    for (j, s) in &scores {
        let w = (s - max).exp();
        sum += w;
        for (d, o) in out.iter_mut().enumerate() {
            *o += w * ci.v.get_f32(
                b * ci.v_strides[0]
                    + kvh * ci.v_strides[1]
                    + j * ci.v_strides[2]
                    + d * ci.v_strides[3],
            ) as f64;
        }
    }
    out.iter_mut().for_each(|o| *o /= sum);
    out
}

/// Error summary of one comparison.
#[derive(Debug, Default)]
pub struct Compared {
    pub max_abs: f64,
    pub rel_l2: f64,
    pub nan_or_unwritten: usize,
    pub n: usize,
}

/// Compares device output against the oracle, all rows or `sample_rows` random ones.
pub fn compare(c: &Case, inp: &Inputs, out: &[f32], rng: &mut StdRng) -> Compared {
    let p = &inp.p;
    let kv = oracle_kv(inp);
    let ci = cpu_inputs(inp, &kv);
    let rows: Vec<(usize, usize, usize)> = match c.sample_rows {
        None => {
            let mut v = vec![];
            for b in 0..p.batch {
                for h in 0..p.q_heads {
                    for i in 0..p.q_len {
                        v.push((b, h, i));
                    }
                }
            }
            v
        }
        Some(n) => (0..n)
            .map(|_| {
                (
                    rng.random_range(0..p.batch),
                    rng.random_range(0..p.q_heads),
                    rng.random_range(0..p.q_len),
                )
            })
            .collect(),
    };
    let full_ref = c
        .sample_rows
        .is_none()
        .then(|| reference::attention_f64(p, &ci));
    let mut r = Compared::default();
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (b, h, i) in rows {
        let base = b * p.out_strides[0] + h * p.out_strides[1] + i * p.out_strides[2];
        let want: Vec<f64> = match &full_ref {
            Some(f) => (0..p.v_head_dim)
                .map(|d| f[base + d * p.out_strides[3]])
                .collect(),
            None => oracle_row(p, &ci, b, h, i),
        };
        for (d, w) in want.iter().enumerate() {
            let got = out[base + d * p.out_strides[3]] as f64;
            r.n += 1;
            if !got.is_finite() {
                r.nan_or_unwritten += 1;
                continue;
            }
            r.max_abs = r.max_abs.max((got - w).abs());
            num += (got - w) * (got - w);
            den += w * w;
        }
    }
    r.rel_l2 = if den > 0.0 {
        (num / den).sqrt()
    } else {
        num.sqrt()
    };
    r
}

/// Tolerances: fp16 keeps P·V within a few 1e-3; bf16 (8-bit mantissa) about 1e-2; fp32 inputs
/// run through fp16 (documented precision of the fp32 path).
pub fn tolerance(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F16 | DType::F32 => (1.5e-2, 5e-3),
        DType::BF16 => (6e-2, 2e-2),
    }
}
