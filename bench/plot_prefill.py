"""Table and plot of a prefill run: `bench_prefill` JSON lines (prefill.txt) against
`fa2_prefill_anchor.py` (fa2.txt), from the same GPU call.

usage: python bench/plot_prefill.py RESULT_DIR   (writes table.md and tflops.png there)
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

d = Path(sys.argv[1])


def load(name):
    rows = [json.loads(l[5:]) for l in (d / name).read_text().splitlines() if l.startswith("JSON ")]
    return {(r["shape"], r["n"], r["batch"]): r for r in rows}


ours, fa2 = load("prefill.txt"), load("fa2.txt")
lines = ["| layer | n | batch | ours ms | ours TFLOP/s | FA2 ms | FA2 TFLOP/s | ours / FA2 |",
         "|---|---|---|---|---|---|---|---|"]
for key, o in ours.items():
    f = fa2[key]
    lines.append(f"| {key[0]} | {key[1] // 1024}k | {key[2]} | {o['ms']:.2f} | {o['tflops']:.0f} | "
                 f"{f['ms']:.2f} | {f['tflops']:.0f} | {100 * o['tflops'] / f['tflops']:.0f}% |")
(d / "table.md").write_text("\n".join(lines) + "\n")

fig, ax = plt.subplots(figsize=(7, 4.5))
for shape, color in [("llama3.1-8b", "tab:blue"), ("qwen2.5-0.5b", "tab:orange")]:
    for batch, style in [(1, "-"), (4, ":")]:
        keys = sorted(k for k in ours if k[0] == shape and k[2] == batch)
        if not keys:
            continue
        ns = [k[1] for k in keys]
        ax.plot(ns, [ours[k]["tflops"] for k in keys], style, marker="o", color=color,
                label=f"saap {shape} b{batch}")
        ax.plot(ns, [fa2[k]["tflops"] for k in keys], style, marker="x", color=color, alpha=0.5,
                label=f"FA2 {shape} b{batch}")
ax.set_xscale("log", base=2)
ax.set_xlabel("prompt tokens (one chunk)")
ax.set_ylabel("TFLOP/s (causal)")
ax.set_title("Causal prefill attention, one layer, bf16")
ax.set_ylim(0, None)
ax.legend(fontsize=7, ncol=2)
fig.tight_layout()
fig.savefig(d / "tflops.png", dpi=120)
