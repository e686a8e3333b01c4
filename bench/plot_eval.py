"""Plots of an evaluation report (examples/evaluate.rs writes report.json):
recall vs keys read per layer (Saap, nearest centroid, perfect selector) and the passkey grid.

usage: python3 bench/plot_eval.py bench/results/eval-.../report.json   (needs matplotlib)
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

path = Path(sys.argv[1])
r = json.loads(path.read_text())
out = path.parent

fig, ax = plt.subplots(figsize=(7, 5))
for key, label, marker in [("saap", "Saap (trained classifier)", "o"), ("nearest_centroid", "nearest centroid (symmetric)", "x")]:
    xs = [100 * l[key]["indexed_selectivity"] for l in r["layers"]]
    ys = [l[key]["indexed_recall"] for l in r["layers"]]
    ax.scatter(xs, ys, marker=marker, label=label)
xs = [100 * l["saap"]["indexed_selectivity"] for l in r["layers"]]
ys = [l["saap"]["oracle_indexed_recall"] for l in r["layers"]]
ax.scatter(xs, ys, marker=".", label="perfect top-k at Saap's budget", color="gray")
if all("partition_oracle_indexed_recall" in l["saap"] for l in r["layers"]):
    xs = [100 * l["saap"]["partition_oracle_indexed_selectivity"] for l in r["layers"]]
    ys = [l["saap"]["partition_oracle_indexed_recall"] for l in r["layers"]]
    ax.scatter(xs, ys, marker="^", label="perfect classifier (best ℓ partitions)", color="green")
ax.set_xlabel("indexed keys read (%)")
ax.set_ylabel("share of indexed attention mass read")
ax.set_title(f"{r['model']}: held-out {r['text']}, {r['context']} tokens, C={r['n_partitions']}, ℓ={r['n_probe']} (one point per layer)")
ax.title.set_fontsize(9)
ax.legend()
ax.grid(alpha=0.3)
fig.tight_layout()
fig.savefig(out / "recall_vs_keys_read.png", dpi=120)

modes = ["Dense", "Saap", "NearestCentroid"]
lengths = sorted({c["length"] for c in r["nih"]})
depths = sorted({c["depth"] for c in r["nih"]})
if lengths and depths:
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.5))
    for ax, mode in zip(axes, modes):
        grid = [[0.0] * len(lengths) for _ in depths]
        for c in r["nih"]:
            ok = any(a[0] == mode and a[2] for a in c["answers"])
            grid[depths.index(c["depth"])][lengths.index(c["length"])] = 1.0 if ok else 0.0
        ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(x) for x in lengths])
        ax.set_yticks(range(len(depths)), [str(d) for d in depths])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(mode)
    fig.suptitle(f"passkey retrieval, {r['model']} (green = exact)")
    fig.tight_layout()
    fig.savefig(out / "passkey_grid.png", dpi=120)
print("wrote plots to", out)
