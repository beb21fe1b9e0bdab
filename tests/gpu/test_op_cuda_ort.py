"""com.flash.FlashAttention inside onnxruntime-gpu's CUDA execution provider (GPU machine only).

Run with the library built `--features cuda` and onnxruntime-gpu on PYTHONPATH:
    FLASH_ORT_LIB=.../libflash_ort.so python -m pytest -q tests/gpu/test_op_cuda_ort.py
Checks: the node runs on the CUDA EP (CPU fallback disabled), random cases against the fp64
reference and the unfused graph on the CUDA EP (TF32 off), bad input, 8 threads on one session,
CUDA graph capture, and two GPUs in one process when the machine has them."""

import dataclasses
import os
import sys
import threading

import numpy as np
import onnxruntime as ort
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
from flash_cases import Case, feeds, flash_model, library_path, reference, rounded_reference, unfused_model  # noqa: E402

try:
    ort.preload_dlls()
except Exception:
    pass

CUDA = "CUDAExecutionProvider"
pytestmark = pytest.mark.skipif(CUDA not in ort.get_available_providers(), reason="needs onnxruntime-gpu")


def cuda_session(model, device_id=0, graph=False, cpu_fallback=False):
    so = ort.SessionOptions()
    so.register_custom_ops_library(library_path())
    so.log_severity_level = 3
    if not cpu_fallback:
        # Fails session creation if any node (ours included) would land on the CPU.
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    opts = {"device_id": device_id, "use_tf32": 0}
    if graph:
        opts["enable_cuda_graph"] = 1
    providers = [(CUDA, opts)] + ([] if not cpu_fallback else ["CPUExecutionProvider"])
    return ort.InferenceSession(model.SerializeToString(), so, providers=providers)


def cpu_session(model):
    so = ort.SessionOptions()
    so.register_custom_ops_library(library_path())
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def gpu_cases():
    rng = np.random.default_rng(7)
    cases = []
    for i in range(40):
        dtype = ["float16", "bfloat16", "float16", "float32"][i % 4]
        hkv = int(rng.choice([1, 2, 4]))
        d = int(rng.choice([32, 64, 96, 128, 256]))
        c = Case(
            b=int(rng.integers(1, 4)), hq=hkv * int(rng.choice([1, 2, 4])), hkv=hkv,
            sq=int(rng.choice([1, 1, rng.integers(1, 300)])), skv=int(rng.integers(1, 600)), d=d, dv=d,
            past=int(rng.choice([0, 0, rng.integers(1, 64)])), layout="3d" if rng.random() < 0.3 else "4d",
            dtype=dtype, is_causal=int(rng.random() < 0.4),
            softcap=0.0 if rng.random() < 0.8 else 20.0,
            window_left=-1 if rng.random() < 0.8 else int(rng.integers(0, 64)),
            nonpad=rng.random() < 0.2, want_present=rng.random() < 0.5, seed=100 + i,
        )
        kind = rng.choice(["none", "bool", "float"])
        if kind != "none":
            c.mask = str(kind)
            c.mask_shape = (c.b, 1, 1, c.total) if rng.random() < 0.5 else (c.b, c.hq, c.sq, c.total)
        if c.past or c.nonpad:  # hosts < 1.24 need no gap before the last optional input
            c.mask = c.mask or "bool"
            c.mask_shape = c.mask_shape or (c.b, 1, 1, c.total)
        cases.append(c)
    return cases


@pytest.mark.parametrize("case", gpu_cases(), ids=lambda c: f"{c.dtype}-{c.layout}-b{c.b}h{c.hq}/{c.hkv}-q{c.sq}k{c.skv}p{c.past}-d{c.d}-c{c.is_causal}-m{c.mask}")
def test_cuda_op_matches_reference(case):
    inputs = case.make_inputs()
    outs = cuda_session(flash_model(case, inputs)).run(None, feeds(inputs))
    y = outs[0].astype(np.float64)
    ref = reference(case, inputs)
    err = np.abs(y - ref).max(initial=0)
    if case.dtype == "float32":
        # fp32 inputs run on fp16/bf16 tensor cores or TF32 (README: precision); bound by fp16 naive error.
        naive = rounded_reference(replace_dtype(case, "float16"), inputs)
        assert err <= 2 * np.abs(naive - ref).max(initial=0) + 2e-3, err
    else:
        naive_err = np.abs(rounded_reference(case, inputs) - ref).max(initial=0)
        assert err <= 2 * naive_err + 1e-3, (err, naive_err)
    if case.want_present:
        assert outs[1].shape == (case.b, case.hkv, case.total, case.d)


def replace_dtype(case, dtype):
    from dataclasses import replace

    return replace(case, dtype=dtype)


def test_cuda_op_matches_unfused_graph_on_cuda():
    case = Case(b=2, hq=8, hkv=2, sq=200, skv=200, d=64, dv=64, dtype="float16", is_causal=1, mask="float", mask_shape=(2, 1, 1, 200))
    inputs = case.make_inputs()
    y = cuda_session(flash_model(case, inputs)).run(None, inputs)[0].astype(np.float32)
    u = cuda_session(unfused_model(case, inputs), cpu_fallback=True).run(None, inputs)[0].astype(np.float32)
    assert np.abs(y - u).max() < 2e-2


def test_bad_input_is_an_error_and_session_survives():
    case = Case(b=1, hq=4, hkv=2, sq=8, skv=8, d=64, dv=64, dtype="float16")
    good = case.make_inputs()
    s = cuda_session(flash_model(case, good, symbolic=True))
    bad = dict(good, K=np.zeros((1, 2, 8, 32), np.float16))
    with pytest.raises(Exception, match="input K"):
        s.run(None, bad)
    bad = dict(good, K=np.zeros((1, 3, 8, 64), np.float16), V=np.zeros((1, 3, 8, 64), np.float16))
    with pytest.raises(Exception, match="multiple of KV heads"):
        s.run(None, bad)
    y = s.run(None, good)[0]
    assert np.abs(y.astype(np.float64) - reference(case, good)).max() < 1e-2


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_eight_threads_on_one_session_match_single_thread(dtype):
    # Each thread has inputs of its own: with one input set, two runs sharing a scratch block by
    # mistake would write the same values into it and still agree. fp32 runs through scratch
    # (the inputs converted, the output combined), which concurrent Run calls once shared.
    case = Case(b=2, hq=16, hkv=4, sq=512, skv=512, d=128, dv=128, dtype=dtype, is_causal=1)
    sets = [dataclasses.replace(case, seed=k).make_inputs() for k in range(4)]
    s = cuda_session(flash_model(case, sets[0]))
    want = [s.run(None, x)[0] for x in sets]
    got, errors = [], []

    def worker(i):
        try:
            for _ in range(10):
                got.append((i, s.run(None, sets[i])[0]))
        except Exception as e:
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(i % len(sets),)) for i in range(8)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert not errors and len(got) == 80
    for i, g in got:
        np.testing.assert_array_equal(g, want[i])


def test_cuda_graph_capture_gives_same_output():
    case = Case(b=1, hq=8, hkv=8, sq=256, skv=256, d=64, dv=64, dtype="float16", is_causal=1)
    inputs = case.make_inputs()
    plain = cuda_session(flash_model(case, inputs)).run(None, inputs)[0]
    s = cuda_session(flash_model(case, inputs), graph=True)
    bind = s.io_binding()
    dev = {k: ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) for k, v in inputs.items()}
    for k, v in dev.items():
        bind.bind_ortvalue_input(k, v)
    out = ort.OrtValue.ortvalue_from_shape_and_type(plain.shape, np.float16, "cuda", 0)
    bind.bind_ortvalue_output("Y", out)
    for _ in range(3):  # warm-up, capture, replay
        s.run_with_iobinding(bind)
    np.testing.assert_array_equal(out.numpy(), plain)
    # Replay with new input values written into the same device buffers.
    new = Case(**{**case.__dict__, "seed": 5, "inputs": {}}).make_inputs()
    for k, v in new.items():
        dev[k].update_inplace(v)
    s.run_with_iobinding(bind)
    want = cuda_session(flash_model(case, new)).run(None, new)[0]
    np.testing.assert_array_equal(out.numpy(), want)


def test_two_gpus_in_one_process():
    try:
        import torch

        n = torch.cuda.device_count()
    except Exception:
        n = 1
    if n < 2:
        pytest.skip("needs two GPUs")
    case = Case(b=2, hq=8, hkv=2, sq=128, skv=300, d=64, dv=64, dtype="float16", is_causal=1)
    inputs = case.make_inputs()
    ref = reference(case, inputs)
    for dev in (0, 1):
        y = cuda_session(flash_model(case, inputs), device_id=dev).run(None, inputs)[0]
        assert np.abs(y.astype(np.float64) - ref).max() < 1e-2, dev
