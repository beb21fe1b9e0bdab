//! CUDA kernel throughput on the ANCHORS.md grid (16k tokens, hidden 2048, D ∈ {64, 128},
//! causal or not, fp16/bf16) and decode (Sq = 1, 32 q heads, 8 KV heads, D = 128). Prints one
//! JSON object per row (TFLOP/s or GB/s of K/V read); `scripts/cuda_bench_table.py` merges them
//! with the PyTorch peers measured in the same run. Times are medians of CUDA-event-timed runs
//! after warm-up.
//!
//! Run: `cargo bench --features cuda --bench cuda_bench` (needs a GPU).

#[path = "../tests/cuda_common/mod.rs"]
mod cuda_common;

use cuda_common::*;
use cudarc::driver::{CudaSlice, DevicePtr};
use flash_ort::attention::{
    self, AttentionAttrs, AttentionProblem, DType, ElemType, InputDescs, TensorDesc,
};
use flash_ort::cuda::{self, DevicePtrs};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn random_device(g: &Gpu, dtype: DType, n: usize, rng: &mut StdRng) -> CudaSlice<u8> {
    g.stream
        .clone_htod(&HostTensor::random(dtype, n, rng).bytes())
        .unwrap()
}

/// Median milliseconds of `iters` timed calls after `warm` untimed ones.
fn time_ms(g: &Gpu, warm: usize, iters: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..warm {
        f();
    }
    g.stream.synchronize().unwrap();
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let a = g
            .ctx
            .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap();
        let b = g
            .ctx
            .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap();
        a.record(&g.stream).unwrap();
        f();
        b.record(&g.stream).unwrap();
        b.synchronize().unwrap();
        times.push(a.elapsed_ms(&b).unwrap() as f64);
    }
    times.sort_by(|x, y| x.partial_cmp(y).unwrap());
    times[times.len() / 2]
}

fn elem(d: DType) -> ElemType {
    match d {
        DType::F16 => ElemType::F16,
        DType::BF16 => ElemType::BF16,
        DType::F32 => ElemType::F32,
    }
}

/// A validated problem with its scratch buffer, launched on device 0 by [`Call::run`].
struct Call {
    p: AttentionProblem,
    splits: usize,
    scratch_len: usize,
    scratch: CudaSlice<u8>,
    ptrs: DevicePtrs,
}

impl Call {
    fn new(g: &Gpu, attrs: &AttentionAttrs, inputs: &InputDescs, ptrs: DevicePtrs) -> Self {
        let p = attention::validate(attrs, inputs).unwrap();
        let (splits, scratch_len) = cuda::plan(&p, 0).unwrap();
        let scratch = g
            .stream
            .clone_htod(&vec![0u8; scratch_len.max(16)])
            .unwrap();
        Call {
            p,
            splits,
            scratch_len,
            scratch,
            ptrs,
        }
    }

    fn run(&self, g: &Gpu) {
        let stream = g.stream.cu_stream() as *mut std::ffi::c_void;
        let scratch = self.scratch.device_ptr(&g.stream).0;
        let p = &self.p;
        cuda::launch(
            p,
            p.k_strides,
            p.v_strides,
            &self.ptrs,
            scratch,
            self.scratch_len,
            stream,
            0,
        )
        .unwrap()
    }
}

fn main() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(1);
    let s = g.stream.clone();
    let tokens = 16384usize;
    let hidden = 2048usize;
    let filter = std::env::var("FLASH_ORT_BENCH").unwrap_or_default();
    // FLASH_ORT_BENCH_DTYPE=float16|bfloat16 measures one element type only.
    let only = std::env::var("FLASH_ORT_BENCH_DTYPE").unwrap_or_default();
    for dtype in [DType::F16, DType::BF16] {
        let name = if dtype == DType::F16 {
            "float16"
        } else {
            "bfloat16"
        };
        if !only.is_empty() && only != name {
            continue;
        }
        let n = tokens * hidden;
        let (q, k, v) = (
            random_device(&g, dtype, n, &mut rng),
            random_device(&g, dtype, n, &mut rng),
            random_device(&g, dtype, n, &mut rng),
        );
        let out = s.clone_htod(&vec![0u8; n * 2]).unwrap();
        let with_mask = std::env::var("FLASH_ORT_BENCH_MASK").is_ok_and(|v| v == "1");
        let zero_mask = s.clone_htod(&vec![0u8; tokens * 2]).unwrap();
        let ptr = |b: &CudaSlice<u8>| b.device_ptr(&s).0;
        // Grid and shapes calls: Q, K and V of `desc` and, with FLASH_ORT_BENCH_MASK=1, a
        // float key-padding mask [B, 1, 1, S] of zeros in Q's type (what BERT-style exports
        // pass), all keys visible.
        let inputs = |desc: TensorDesc, b: usize, seq: usize| InputDescs {
            q: Some(desc.clone()),
            k: Some(desc.clone()),
            v: Some(desc),
            attn_mask: with_mask
                .then(|| TensorDesc::new(elem(dtype), &[b as i64, 1, 1, seq as i64])),
            ..Default::default()
        };
        let ptrs = || DevicePtrs {
            q: ptr(&q),
            k: ptr(&k),
            v: ptr(&v),
            mask: if with_mask { ptr(&zero_mask) } else { 0 },
            nonpad_kv_seqlen: 0,
            out: ptr(&out),
        };
        if filter.is_empty() || filter == "grid" {
            for d in [64usize, 128] {
                for causal in [false, true] {
                    // FLASH_ORT_BENCH_SEQS=2048,... replaces the grid's sequence lengths.
                    let seqs: Vec<usize> = std::env::var("FLASH_ORT_BENCH_SEQS")
                        .ok()
                        .and_then(|v| v.split(',').map(|x| x.trim().parse().ok()).collect())
                        .unwrap_or_else(|| vec![1024, 4096, 16384]);
                    for seq in seqs {
                        // FLASH_ORT_BENCH_ONE=D,causal(0/1),S runs one grid row (for profiling).
                        if let Ok(one) = std::env::var("FLASH_ORT_BENCH_ONE") {
                            if one != format!("{d},{},{seq}", causal as u8) || dtype != DType::F16 {
                                continue;
                            }
                        }
                        let b = tokens / seq;
                        let h = hidden / d;
                        let desc = TensorDesc::new(
                            elem(dtype),
                            &[b as i64, h as i64, seq as i64, d as i64],
                        );
                        let attrs = AttentionAttrs {
                            is_causal: causal,
                            ..Default::default()
                        };
                        let c = Call::new(&g, &attrs, &inputs(desc, b, seq), ptrs());
                        let mut call = || c.run(&g);
                        let ms = time_ms(&g, 3, 20, &mut call);
                        let flops =
                            4.0 * (b * h * seq * seq * d) as f64 / if causal { 2.0 } else { 1.0 };
                        println!(
                            "{{\"kind\":\"grid\",\"mask\":{with_mask},\"dtype\":\"{}\",\"d\":{d},\"causal\":{causal},\"n\":{seq},\"b\":{b},\"h\":{h},\"ms\":{ms:.4},\"ours\":{:.1}}}",
                            if dtype == DType::F16 { "float16" } else { "bfloat16" },
                            flops / (ms * 1e-3) / 1e12
                        );
                    }
                }
            }
        }
        // FLASH_ORT_BENCH=shapes: small calls as models make them, one layer each:
        // FLASH_ORT_BENCH_SHAPES="BxHxSxD,…" ([B, S, H·D] inputs, 3D as a fused BERT reads its
        // projections; default BERT-base at B = 1 and 8, S = 128 and 512), with the float
        // key-padding mask when FLASH_ORT_BENCH_MASK=1. Microseconds per call over 50 calls in
        // a row (launch gaps included, as in a model) and of a call alone.
        if filter == "shapes" {
            let spec = std::env::var("FLASH_ORT_BENCH_SHAPES")
                .unwrap_or_else(|_| "1x12x128x64,8x12x128x64,1x12x512x64,8x12x512x64".into());
            for item in spec.split(',') {
                let dims: Vec<usize> = item
                    .split('x')
                    .filter_map(|x| x.trim().parse().ok())
                    .collect();
                let [b, h, seq, d] = dims[..] else {
                    eprintln!("FLASH_ORT_BENCH_SHAPES: '{item}' is not BxHxSxD");
                    continue;
                };
                if b * seq * h * d > n || b * seq > tokens {
                    eprintln!("{item}: larger than the bench's buffers");
                    continue;
                }
                let desc = TensorDesc::new(elem(dtype), &[b as i64, seq as i64, (h * d) as i64]);
                let attrs = AttentionAttrs {
                    q_num_heads: Some(h),
                    kv_num_heads: Some(h),
                    ..Default::default()
                };
                let c = Call::new(&g, &attrs, &inputs(desc, b, seq), ptrs());
                let splits = c.splits;
                let mut call = || c.run(&g);
                let one = time_ms(&g, 5, 50, &mut call) * 1e3;
                let row = time_ms(&g, 2, 10, || (0..50).for_each(|_| call())) * 1e3 / 50.0;
                println!(
                    "{{\"kind\":\"shape\",\"dtype\":\"{name}\",\"b\":{b},\"h\":{h},\"s\":{seq},\"d\":{d},\"mask\":{with_mask},\"splits\":{splits},\"us_alone\":{one:.2},\"us_in_a_row\":{row:.2}}}"
                );
            }
        }
        drop((q, k, v, out));
        if filter.is_empty() || filter == "decode" {
            let (hq, hkv, d) = (32usize, 8usize, 128usize);
            let kv_n = 8 * hkv * 65536 * d;
            let kd = random_device(&g, dtype, kv_n, &mut rng);
            let vd = random_device(&g, dtype, kv_n, &mut rng);
            let qd = random_device(&g, dtype, 8 * hq * d, &mut rng);
            let od = s.clone_htod(&vec![0u8; 8 * hq * d * 2]).unwrap();
            for b in [1usize, 8] {
                for skv in [8192usize, 65536] {
                    let e = elem(dtype);
                    let inputs = InputDescs {
                        q: Some(TensorDesc::new(e, &[b as i64, hq as i64, 1, d as i64])),
                        k: Some(TensorDesc::new(
                            e,
                            &[b as i64, hkv as i64, skv as i64, d as i64],
                        )),
                        v: Some(TensorDesc::new(
                            e,
                            &[b as i64, hkv as i64, skv as i64, d as i64],
                        )),
                        ..Default::default()
                    };
                    let ptrs = DevicePtrs {
                        q: ptr(&qd),
                        k: ptr(&kd),
                        v: ptr(&vd),
                        mask: 0,
                        nonpad_kv_seqlen: 0,
                        out: ptr(&od),
                    };
                    let c = Call::new(&g, &AttentionAttrs::default(), &inputs, ptrs);
                    let splits = c.splits;
                    let mut call = || c.run(&g);
                    let ms = time_ms(&g, 5, 50, &mut call);
                    let bytes = 2.0 * (b * hkv * skv * d * 2) as f64;
                    println!(
                        "{{\"kind\":\"decode\",\"dtype\":\"{}\",\"B\":{b},\"Skv\":{skv},\"splits\":{splits},\"ms\":{ms:.4},\"ours\":{:.0}}}",
                        if dtype == DType::F16 { "float16" } else { "bfloat16" },
                        bytes / (ms * 1e-3) / 1e9
                    );
                }
            }
        }
    }
}
