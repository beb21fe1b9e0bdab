#!/usr/bin/env python3
"""Merges the JSON lines of benches/cuda_bench.rs (ours) and scripts/cuda_peers_torch.py (peers),
measured in one run, into the markdown tables of bench/results/cuda.md.
Usage: cuda_bench_table.py OURS.jsonl PEERS.jsonl [--json ROWS.json]
--json also writes the merged rows in the form bench/plot.py --kernel reads."""
import json, sys


def load(path):
    rows = []
    for line in open(path):
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


ours, peers = load(sys.argv[1]), load(sys.argv[2])
dev = next((r for r in peers if r.get("kind") == "device"), {})
copy = next((r for r in peers if r.get("kind") == "copy"), {})
print(f"GPU: {dev.get('name', '?')}, PyTorch {dev.get('torch', '?')}; device-to-device copy "
      f"{copy.get('GBps', '?')} GB/s (read + write)\n")


def ratio(a, b):
    return f"{a / b:.2f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-"


print("| dtype | D | causal | S | B×H | flash-ort TFLOP/s | torch flash | torch cuDNN | ours/flash | ours/cuDNN |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in ours:
    if r.get("kind") != "grid":
        continue
    p = next((x for x in peers if x.get("kind") == "grid" and all(x.get(k) == r[k] for k in ("dtype", "d", "causal", "n"))), {})
    print(f"| {r['dtype']} | {r['d']} | {'yes' if r['causal'] else 'no'} | {r['n']} | {r['b']}×{r['h']} | {r['ours']} | "
          f"{p.get('flash', '-')} | {p.get('cudnn', '-')} | {ratio(r['ours'], p.get('flash'))} | {ratio(r['ours'], p.get('cudnn'))} |")
print()
print("| dtype | B | Skv | splits | flash-ort GB/s | torch flash | torch cuDNN | ours/flash | % of copy BW |")
print("|---|---|---|---|---|---|---|---|---|")
for r in ours:
    if r.get("kind") != "decode":
        continue
    p = next((x for x in peers if x.get("kind") == "decode" and all(x.get(k) == r[k] for k in ("dtype", "B", "Skv"))), {})
    bw = copy.get("GBps")
    pct = f"{100 * r['ours'] / bw:.0f}%" if isinstance(bw, (int, float)) else "-"
    print(f"| {r['dtype']} | {r['B']} | {r['Skv']} | {r['splits']} | {r['ours']} | {p.get('flash', '-')} | "
          f"{p.get('cudnn', '-')} | {ratio(r['ours'], p.get('flash'))} | {pct} |")

if len(sys.argv) > 4 and sys.argv[3] == "--json":
    rows = []
    for r in ours:
        if r.get("kind") == "grid":
            p = next((x for x in peers if x.get("kind") == "grid" and all(x.get(k) == r[k] for k in ("dtype", "d", "causal", "n"))), {})
            rows.append({k: r[k] for k in ("dtype", "d", "causal", "n", "b", "h")} |
                        {"flash_ort_kernel": r["ours"], "torch_flash": p.get("flash"), "torch_cudnn": p.get("cudnn")})
        elif r.get("kind") == "decode":
            p = next((x for x in peers if x.get("kind") == "decode" and all(x.get(k) == r[k] for k in ("dtype", "B", "Skv"))), {})
            rows.append({"decode": True, "dtype": r["dtype"], "b": r["B"], "skv": r["Skv"], "hq": 32, "hkv": 8, "d": 128,
                         "flash_ort_kernel_GBps": r["ours"], "torch_flash_GBps": p.get("flash"),
                         "torch_cudnn_GBps": p.get("cudnn")})
    with open(sys.argv[4], "w") as f:
        json.dump(rows, f, indent=1)
