"""The end-to-end tools on the CPU EP with the tiny models in models/: model_bench.py (prepare, run,
maxseq, table), reliability.py (threads, soak, bad inputs) and plot.py (when matplotlib is
there). They exist for the GPU; this keeps them working between GPU runs.

    python -m pytest -q tests/e2e        (needs `cargo build --release` or a debug build)
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


def built(name):
    for profile in ("release", "debug"):
        p = ROOT / "target" / profile / name
        if p.exists():
            return str(p)
    return None


BIN = os.environ.get("FLASH_ORT_BIN") or built("flash-ort")
LIB = os.environ.get("FLASH_ORT_LIB") or built("libflash_ort.so")
pytestmark = pytest.mark.skipif(not (BIN and LIB), reason="flash-ort not built (cargo build --release)")
MODELS = ["bert_eager_ts17.onnx", "llama_gqa_sdpa_dyn18.onnx"]


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    """A manifest folder like export_large.py writes, with two tiny exports, prepared."""
    d = tmp_path_factory.mktemp("bench")
    manifest = json.loads((ROOT / "models" / "manifest.json").read_text())
    recs = [r for r in manifest["models"] if r["file"] in MODELS]
    for r in recs:
        shutil.copy(ROOT / "models" / r["file"], d / r["file"])
    (d / "manifest_large.json").write_text(json.dumps({"models": recs}))
    p = subprocess.run([PY, "bench/model_bench.py", "prepare", "--manifest", str(d / "manifest_large.json"),
                        "--flash-ort", BIN, "--ort-opt", "--provider", "cpu"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return d


def test_prepare_fuses_every_site(bench_dir):
    forms = json.loads((bench_dir / "forms.json").read_text())["models"]
    for name, e in forms.items():
        assert e["forms"]["flash"]["fused_sites"] == e["attention_sites"], (name, e["forms"]["flash"])
        assert (bench_dir / e["forms"]["flash"]["file"]).exists()


def test_run_maxseq_and_table(bench_dir):
    out = bench_dir / "results.json"
    common = ["--forms", str(bench_dir / "forms.json"), "--out", str(out), "--provider", "cpu", "--library", LIB]
    p = subprocess.run([PY, "bench/model_bench.py", "run", *common, "--seqs", "4,16", "--batches", "1,2",
                        "--target-s", "0.05", "--budget-s", "120"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    flash = [x for x in res["points"] if x["form"] == "flash"]
    assert len(flash) == 2 * 4 and all(x["status"] == "ok" for x in flash), flash
    assert all(x["latency_ms_median"] > 0 and x["peak_mib"] >= 0 for x in flash)
    # A second run into the same file keeps what was measured instead of redoing it.
    p = subprocess.run([PY, "bench/model_bench.py", "run", *common, "--seqs", "4", "--batches", "1",
                        "--budget-s", "60"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and len(json.loads(out.read_text())["points"]) == len(res["points"])
    # The tiny models learn 16 positions: the search stops at the table's end.
    p = subprocess.run([PY, "bench/model_bench.py", "maxseq", *common, "--models", "bert_eager_ts17",
                        "--forms-only", "flash", "--cap", "64", "--resolution", "4", "--budget-s", "120"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    ms = json.loads(out.read_text())["maxseq"]
    assert ms and ms[0]["longest_ok"] == 16 and ms[0]["complete"], ms
    table = subprocess.run([PY, "bench/model_bench.py", "table", str(out)], cwd=ROOT, capture_output=True,
                           text=True, timeout=60).stdout
    assert "### llama_gqa_sdpa_dyn18" in table and "| 2 | 16 |" in table


def test_reliability_on_a_fused_decoder(bench_dir):
    model = bench_dir / "llama_gqa_sdpa_dyn18.flash.onnx"
    out = bench_dir / "reliability.json"
    p = subprocess.run([PY, "tests/e2e/reliability.py", "--model", str(model), "--provider", "cpu", "--library", LIB,
                        "--runs", "300", "--seqs", "4,9,16", "--max-seq", "16", "--thread-runs", "3", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    rec = json.loads(out.read_text())["results"][0]
    assert set(rec["checks"]) == {"threads", "soak", "bad_inputs"} and rec["ok"]
    assert rec["checks"]["threads"]["identical_to_single_thread"] == 8 * 3
    assert all(c["raised"] for c in rec["checks"]["bad_inputs"]["cases"].values() if c["must_raise"])


def test_plot_from_results(bench_dir):
    pytest.importorskip("matplotlib")
    out = bench_dir / "results.json"
    if not out.exists():
        pytest.skip("run test_run_maxseq_and_table first")
    p = subprocess.run([PY, "bench/plot.py", "--models", str(out), "--out", str(bench_dir / "png")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert sorted(x.name for x in (bench_dir / "png").iterdir()) == [
        "model_bert_eager_ts17.png", "model_llama_gqa_sdpa_dyn18.png"]


def test_ort_opt_flash_form(tmp_path):
    """ORT's optimizer with attention fusion off, then flash-ort fuse: every attention site still
    fuses, ORT's LayerNorm/GELU fusions are there, and the form matches the unfused export."""
    pytest.importorskip("sympy", reason="ORT's transformer optimizer needs sympy (symbolic shape inference)")
    manifest = json.loads((ROOT / "models" / "manifest.json").read_text())
    recs = [r for r in manifest["models"] if r["file"] in MODELS]
    for r in recs:
        shutil.copy(ROOT / "models" / r["file"], tmp_path / r["file"])
    (tmp_path / "manifest_large.json").write_text(json.dumps({"models": recs}))
    p = subprocess.run([PY, "bench/model_bench.py", "prepare", "--manifest", str(tmp_path / "manifest_large.json"),
                        "--flash-ort", BIN, "--library", LIB, "--ort-opt-flash", "--nopack", "--parity",
                        "--provider", "cpu"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    forms = json.loads((tmp_path / "forms.json").read_text())["models"]
    for name, e in forms.items():
        of = e["forms"]["ort_opt_flash"]
        assert of["fused_sites"] == e["attention_sites"], (name, of)
        assert of["ops"].get("FlashAttention") == e["attention_sites"] and "Softmax" not in of["ops"], of["ops"]
        assert of["optimizer"]["fused_ops"], of  # float32 exports: LayerNorm (BERT), RMSNorm (LLaMA) fuse
        assert e["parity"]["forms"]["ort_opt_flash"]["ok"], e["parity"]
        assert e["parity"]["forms"]["flash"]["ok"], e["parity"]
    bert = forms["bert_eager_ts17"]["forms"]["ort_opt_flash"]
    assert bert["optimizer"]["fused_ops"].get("SkipLayerNormalization") and bert["optimizer"]["fused_ops"].get("BiasGelu")
    # The A/B forms of the same optimized graph, all matching the unfused export: by default the
    # K/V bias Adds are folded away (Q/K/V stay three MatMuls, one Add per site); --no-fold-bias
    # packs them (two MatMuls fewer, a Split); with --no-pack-qkv too, three MatMuls and three Adds.
    sites = forms["bert_eager_ts17"]["attention_sites"]
    import onnx
    ops = lambda f: [n.op_type for n in onnx.load(str(tmp_path / f), load_external_data=False).graph.node]
    folded = ops(bert["file"])
    for form in ("ort_opt_flash_pack", "ort_opt_flash_nopack"):
        e = forms["bert_eager_ts17"]["forms"][form]
        assert e["fused_sites"] == sites, e
        assert forms["bert_eager_ts17"]["parity"]["forms"][form]["ok"]
    packed = ops(forms["bert_eager_ts17"]["forms"]["ort_opt_flash_pack"]["file"])
    unpacked = ops(forms["bert_eager_ts17"]["forms"]["ort_opt_flash_nopack"]["file"])
    assert unpacked.count("MatMul") == folded.count("MatMul") == packed.count("MatMul") + 2 * sites, (folded, packed)
    assert packed.count("Split") - unpacked.count("Split") == sites and "Split" not in folded
    # The default form also went through ORT's attention-off pass again after flash-ort: with the
    # padding-mask gather (and its Shape of the embedding output) gone, EmbedLayerNormalization
    # fuses and takes the embedding's two Adds; no shape arithmetic is left.
    assert bert["optimizer_after_fuse"]["fused"].get("EmbedLayerNormalization") == 1, bert
    assert folded.count("EmbedLayerNormalization") == 1 and "EmbedLayerNormalization" not in unpacked
    assert not {"Shape", "Range", "Flatten"} & set(folded), folded
    assert unpacked.count("Add") == folded.count("Add") + 2 * sites + 2, (folded, unpacked)
    out = tmp_path / "results.json"
    p = subprocess.run([PY, "bench/model_bench.py", "run", "--forms", str(tmp_path / "forms.json"), "--out", str(out),
                        "--provider", "cpu", "--library", LIB, "--seqs", "8", "--batches", "1", "--target-s", "0.02",
                        "--budget-s", "120"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    pts = [x for x in json.loads(out.read_text())["points"] if x["form"] == "ort_opt_flash"]
    assert len(pts) == 2 and all(x["status"] == "ok" for x in pts), pts
    table = subprocess.run([PY, "bench/model_bench.py", "table", str(out)], cwd=ROOT, capture_output=True,
                           text=True, timeout=60).stdout
    assert "ort_opt_flash speed-up vs unfused" in table and "Parity against the unfused export" in table


def test_two_gpu_check_skips_without_a_second_gpu(bench_dir):
    out = bench_dir / "two_gpu.json"
    p = subprocess.run([PY, "tests/e2e/reliability.py", "--model", str(bench_dir / "bert_eager_ts17.flash.onnx"),
                        "--provider", "cpu", "--library", LIB, "--checks", "two_gpu", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    c = json.loads(out.read_text())["results"][0]["checks"]["two_gpu"]
    assert c["ok"] and c["ran"] is False and "second GPU" in c["skipped"], c
