"""Plot of `throughput` runs: tokens/s dense vs Saap against context, per batch and routing; one
panel per step mode (step by step, CUDA graph) when the runs record it.

usage: python bench/plot_throughput.py RESULT_DIR LOG...   (reads the JSON lines of the logs in
RESULT_DIR; writes throughput.png there)
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

d = Path(sys.argv[1])
rows = [json.loads(l[5:]) for name in sys.argv[2:] for l in (d / name).read_text().splitlines()
        if l.startswith("JSON ")]
modes = sorted({r.get("graph", False) for r in rows})
fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.5), sharey=True, squeeze=False)
for ax, graph in zip(axes[0], modes):
    for batch, color in [(1, "tab:blue"), (8, "tab:orange"), (32, "tab:green")]:
        sel = sorted((r for r in rows if r["batch"] == batch and r.get("graph", False) == graph),
                     key=lambda r: r["context"])
        if not sel:
            continue
        dense = {r["context"]: r["dense_tok_s"] for r in sel}
        ax.plot(list(dense), list(dense.values()), "--", marker="s", color=color,
                label=f"dense b{batch}")
        for sparse, style in [(False, "-"), (True, ":")]:
            pts = [r for r in sel if r["all_sparse"] == sparse]
            name = "Saap all layers" if sparse else "Saap policy"
            ax.plot([r["context"] for r in pts], [r["saap_tok_s"] for r in pts], style, marker="o",
                    color=color, label=f"{name} b{batch}")
    ax.set_xlabel("context (tokens)")
    ax.set_yscale("log")
    ax.set_title("CUDA graph per step" if graph else "step by step (eager)")
    ax.legend(fontsize=7)
axes[0][0].set_ylabel("tokens/s (all items)")
fig.suptitle("Qwen2.5-Coder-0.5B decode, dense vs Saap on the same caches (H200)")
fig.tight_layout()
fig.savefig(d / "throughput.png", dpi=120)
