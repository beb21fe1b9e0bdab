#!/usr/bin/env python3
"""PNG plots from the benchmarks' own JSON output.

- `--kernel FILE`: the JSON of bench/gpu_ort_bench.py, or of scripts/cuda_bench_table.py --json
  (the kernel alone, key `flash_ort_kernel`). One figure per dtype, a panel per
  (head dim, causal): attention forward TFLOP/s against sequence length for com.flash.FlashAttention
  in ORT and its peers (ORT MultiHeadAttention, PyTorch SDPA flash and cuDNN); and one figure of
  the decode rows (GB/s of K/V read per batch and KV length).
- `--models FILE`: the JSON of bench/model_bench.py. One figure per model: latency, peak device
  memory and speed-up over the unfused export against sequence length for each form (unfused
  export, ORT optimizer, flash-ort fuse, ORT optimizer without attention fusion + flash-ort fuse)
  and batch size; points that ran out of memory are marked with a cross where the line stops.

    python bench/plot.py [--kernel gpu_ort_bench.json] [--models model_bench.json] --out DIR
        [--device "NVIDIA H100 80GB HBM3"] [--date 2026-11-22]

Device and date go into every title: model_bench.py records them in its JSON; gpu_ort_bench.py
prints the device on its first line only, so pass `--device`/`--date` for its plots.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PEERS = [  # key in gpu_ort_bench.py's rows, label, style
    ("flash_ort", "flash-ort (ORT CUDA EP)", dict(color="tab:red", marker="o", lw=2.2)),
    ("flash_ort_kernel", "flash-ort kernel", dict(color="tab:red", marker="o", lw=2.2)),
    ("ort_mha", "ORT MultiHeadAttention", dict(color="tab:blue", marker="s")),
    ("torch_flash", "PyTorch SDPA flash (FA2)", dict(color="tab:green", marker="^")),
    ("torch_cudnn", "PyTorch SDPA cuDNN", dict(color="tab:purple", marker="v")),
]
FORM_STYLE = {
    "unfused": ("unfused export", "tab:gray"),
    "ort_opt": ("ORT transformer optimizer", "tab:blue"),
    "flash": ("flash-ort fuse", "tab:red"),
    "ort_opt_flash": ("ORT optimizer (no attention) + flash-ort", "tab:orange"),
    "ort_opt_flash_pack": ("ORT optimizer (no attention) + flash-ort, K/V biases kept, Q/K/V packed", "tab:pink"),
    "ort_opt_flash_nopack": ("ORT optimizer (no attention) + flash-ort, K/V biases kept, Q/K/V not packed", "tab:brown"),
}
BATCH_LINE = {1: "-", 8: "--"}


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def number(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def kernel_plots(rows: list, out: Path, subtitle: str, prefix: str = "") -> list:
    written = []
    fwd = [r for r in rows if not r.get("decode")]
    for dtype in sorted({r["dtype"] for r in fwd}):
        rs = [r for r in fwd if r["dtype"] == dtype]
        panels = sorted({(r["d"], r["causal"]) for r in rs})
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), squeeze=False, sharey=True)
        for ax, (d, causal) in zip(axes[0], panels):
            pr = sorted((r for r in rs if r["d"] == d and r["causal"] == causal), key=lambda r: r["n"])
            for key, label, style in PEERS:
                pts = [(r["n"], number(r.get(key))) for r in pr]
                pts = [(n, v) for n, v in pts if v is not None]
                if pts:
                    ax.plot(*zip(*pts), label=label, **style)
            ax.set_xscale("log", base=2)
            ax.set_xticks([r["n"] for r in pr], [f"{r['n'] // 1024}k" if r["n"] >= 1024 else str(r["n"]) for r in pr])
            ax.set_title(f"D={d}, {'causal' if causal else 'non-causal'}")
            ax.set_xlabel("sequence length (batch × length = 16k tokens)")
            ax.grid(alpha=0.3)
        top = max((number(r.get(k)) or 0) for r in rs for k, _, _ in PEERS)
        axes[0][0].set_ylim(0, 1.05 * top)  # shared by every panel
        axes[0][0].set_ylabel("attention forward TFLOP/s")
        axes[0][0].legend(fontsize=8, loc="lower right")
        fig.suptitle(f"Attention forward, {dtype}, hidden 2048 — {subtitle}")
        written.append(save(fig, out / f"{prefix}kernel_tflops_{dtype}.png"))
    dec = [r for r in rows if r.get("decode") and r.get("dtype", "float16") == "float16"]
    if dec:
        dec.sort(key=lambda r: (r["b"], r["skv"]))
        labels = [f"B={r['b']}\nSkv={r['skv'] // 1024}k" for r in dec]
        keys = [(k, lab, st) for k, lab, st in PEERS
                if k != "ort_mha" and any(number(r.get(f"{k}_GBps")) for r in dec)]
        width = 0.8 / len(keys)
        fig, ax = plt.subplots(figsize=(7.5, 4.0))
        for i, (key, label, style) in enumerate(keys):
            vals = [number(r.get(f"{key}_GBps")) or 0 for r in dec]
            ax.bar([x + (i - (len(keys) - 1) / 2) * width for x in range(len(dec))], vals, width,
                   label=label, color=style["color"])
        ax.set_xticks(range(len(dec)), labels)
        ax.set_ylabel("GB/s of K and V read")
        h = dec[0]
        ax.set_title(f"Decode (Sq=1), {h['hq']} query / {h['hkv']} KV heads, D={h['d']}, fp16 — {subtitle}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
        written.append(save(fig, out / f"{prefix}kernel_decode.png"))
    return written


def model_plots(res: dict, out: Path, subtitle: str) -> list:
    written = []
    meta = res.get("meta", {})
    device = meta.get("gpu") or meta.get("cpu") or "unknown device"
    sub = subtitle or f"{device.split(',')[0]}, {meta.get('date_utc', '')[:10]}"
    for model in sorted({p["model"] for p in res["points"]}):
        pts = [p for p in res["points"] if p["model"] == model]
        fig, (ax_t, ax_m, ax_s) = plt.subplots(1, 3, figsize=(16, 4.2))
        unfused = {(p["batch"], p["seq"]): p["latency_ms_median"] for p in pts
                   if p["form"] == "unfused" and p["status"] == "ok"}
        for form in [f for f in FORM_STYLE if any(p["form"] == f for p in pts)]:
            label, color = FORM_STYLE[form]
            for b in sorted({p["batch"] for p in pts if p["form"] == form}):
                series = sorted((p for p in pts if p["form"] == form and p["batch"] == b), key=lambda p: p["seq"])
                ok = [p for p in series if p["status"] == "ok"]
                style = dict(color=color, ls=BATCH_LINE.get(b, ":"), marker="o", ms=4)
                if ok:
                    ax_t.plot([p["seq"] for p in ok], [p["latency_ms_median"] for p in ok], label=f"{label}, batch {b}", **style)
                    ax_m.plot([p["seq"] for p in ok], [p["peak_mib"] / 1024 for p in ok], label=f"{label}, batch {b}", **style)
                    sp = [(p["seq"], unfused[(b, p["seq"])] / p["latency_ms_median"]) for p in ok
                          if form != "unfused" and (b, p["seq"]) in unfused]
                    if sp:
                        ax_s.plot(*zip(*sp), **style)
                oom = [p for p in series if p["status"] == "oom"]
                if oom:
                    # The first S that ran out of memory: a cross at the top of both panels.
                    for ax in (ax_t, ax_m):
                        ax.plot([oom[0]["seq"]], [0.96], "x", color=color, ms=9, mew=2,
                                transform=ax.get_xaxis_transform(), clip_on=False)
        seqs = sorted({p["seq"] for p in pts})
        for ax in (ax_t, ax_m, ax_s):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(seqs, [f"{s // 1024}k" if s >= 1024 else str(s) for s in seqs])
            ax.minorticks_off()
            ax.set_xlabel("sequence length")
            ax.grid(alpha=0.3)
        limit = meta.get("gpu_mem_limit_gb")
        if limit:
            ax_m.axhline(limit, color="black", lw=0.8, ls=":")
            ax_m.text(0.01, limit, f"arena limit {limit:g} GiB", va="bottom", fontsize=8,
                      transform=ax_m.get_yaxis_transform())
        ax_t.plot([], [], "x", color="black", ms=8, mew=2, label="out of memory at this S")
        ax_t.set_ylabel("latency, ms (median)")
        ax_m.set_ylabel("peak device memory, GiB" if meta.get("provider") != "cpu" else "peak RSS growth, GiB")
        ax_t.set_title("latency")
        ax_m.set_title("peak memory")
        ax_s.set_title("speed-up over the unfused export")
        ax_s.set_ylabel("unfused latency / form latency")
        for y, txt in ((1, "1×"), (2, "2× (issue 5 target)")):
            ax_s.axhline(y, color="black", lw=0.8, ls=":")
            ax_s.text(0.01, y, txt, va="bottom", fontsize=8, transform=ax_s.get_yaxis_transform())
        ax_t.legend(fontsize=7)
        info = res.get("models", {}).get(model, {})
        fig.suptitle(f"{model} ({info.get('dtype', '')}, {info.get('exporter', '')} opset {info.get('opset', '')}) — {sub}")
        written.append(save(fig, out / f"model_{model}.png"))
    return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", help="JSON written by bench/gpu_ort_bench.py")
    ap.add_argument("--models", help="JSON written by bench/model_bench.py")
    ap.add_argument("--out", required=True, help="folder for the PNG files")
    ap.add_argument("--device", help="GPU name for the kernel plots' titles")
    ap.add_argument("--date", help="date of the kernel run, for the titles")
    ap.add_argument("--prefix", default="", help="prefix of the kernel plots' file names (ort_ for the op-in-ORT run)")
    a = ap.parse_args()
    if not a.kernel and not a.models:
        ap.error("nothing to plot: give --kernel and/or --models")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if a.kernel:
        rows = json.loads(Path(a.kernel).read_text())
        if not isinstance(rows, list):
            ap.error(f"--kernel {a.kernel}: expected the list of rows gpu_ort_bench.py writes")
        subtitle = ", ".join(x for x in (a.device, a.date) if x) or "device not given (--device)"
        written += kernel_plots(rows, out, subtitle, a.prefix)
    if a.models:
        res = json.loads(Path(a.models).read_text())
        if "points" not in res:
            ap.error(f"--models {a.models}: expected the results model_bench.py writes")
        sub = ", ".join(x for x in (a.device, a.date) if x)
        written += model_plots(res, out, sub)
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
