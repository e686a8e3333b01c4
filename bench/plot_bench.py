"""Table and plots of a GPU benchmark run: `bench_report` JSON lines + `fa2_decode_anchor.py`.

usage: python bench/plot_bench.py RESULT_DIR   (reads report.txt and fa2.txt there; writes
table.md, time_vs_context.png, bandwidth.png, bytes_per_step.png)
"""
import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

d = Path(sys.argv[1])
rows = [json.loads(l[5:]) for l in (d / "report.txt").read_text().splitlines() if l.startswith("JSON ")]
fa2_text = (d / "fa2.txt").read_text()
copy = float(re.search(r"copy ceiling: ([\d.]+) TB/s", fa2_text).group(1))
fa2 = {int(n): float(us) for n, us in re.findall(r"N=\s*(\d+) FLASH\(FA2\)\s+layer\s+([\d.]+) us", fa2_text)}


def get(kind, n, b):
    for r in rows:
        if r["kind"] == kind and r["n"] == n and r["batch"] == b:
            return r
    return None


lens = sorted({r["n"] for r in rows if r["n"] > 0})
batches = sorted({r["batch"] for r in rows if r["n"] > 0})
tbs = lambda r: r["bytes"] / (r["us"] * 1e-6) / 1e12  # noqa: E731
out = [
    f"Copy ceiling measured in the same run: {copy:.2f} TB/s. FA2 = PyTorch SDPA flash backend, batch 1 only.",
    "",
    "| N | B | FA2 µs | dense kernel µs | dense TB/s (% copy) | Saap kernel µs | Saap kernel TB/s (% copy) "
    "| Saap step µs (device) | step wall µs | step MB read | step TB/s (% copy) | keys read % "
    "| kernel / step speedup vs FA2 | dense step µs |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
]
for n in lens:
    for b in batches:
        dk, sk, ss, ds = (get(k, n, b) for k in ("dense_kernel", "saap_kernel", "saap_step", "dense_step"))
        if not (dk and sk and ss and ds):
            continue
        f = fa2.get(n) if b == 1 else None
        fa = f"{f:.1f}" if f else "–"
        sp = f"{f / sk['us']:.1f}× / {f / ss['us']:.1f}×" if f else "–"
        out.append(
            f"| {n} | {b} | {fa} | {dk['us']:.1f} | {tbs(dk):.2f} ({100 * tbs(dk) / copy:.0f} %) "
            f"| {sk['us']:.1f} | {tbs(sk):.2f} ({100 * tbs(sk) / copy:.0f} %) | {ss['us']:.1f} | {ss['wall_us']:.1f} "
            f"| {ss['bytes'] / 1e6:.1f} | {tbs(ss):.2f} ({100 * tbs(ss) / copy:.0f} %) "
            f"| {100 * ss['keys_read'] / ss['keys_in_context']:.2f} | {sp} | {ds['us']:.1f} |"
        )
out += ["", "| routing (classifier + top-ℓ) | B | µs (device) | MB read |", "|---|---|---|---|"]
for r in rows:
    if r["kind"].startswith("route"):
        name = "CUDA kernels, bf16 weights" if r["kind"] == "route" else "candle ops, f32 weights (before)"
        out.append(f"| {name} | {r['batch']} | {r['us']:.1f} | {r['bytes'] / 1e6:.1f} |")
out += ["", "| index build, one layer, batch 1 | N | extend (all) ms | assign ms | partition-scan merge ms |",
        "|---|---|---|---|---|"]
for r in rows:
    if r["kind"] == "index_build":
        out.append(f"| | {r['n']} | {r['extend_us'] / 1e3:.1f} | {r['assign_us'] / 1e3:.1f} | {r['merge_us'] / 1e3:.2f} |")
(d / "table.md").write_text("\n".join(out) + "\n")

fig, ax = plt.subplots(figsize=(7, 4.5))
xs = [n / 1024 for n in lens]
ax.plot([n / 1024 for n in sorted(fa2)], [fa2[n] for n in sorted(fa2)], "o-", label="FA2 (PyTorch SDPA), B=1")
for kind, lab in [("dense_kernel", "our dense kernel"), ("saap_kernel", "Saap kernel"), ("saap_step", "Saap whole step")]:
    ax.plot(xs, [get(kind, n, 1)["us"] for n in lens], "o-", label=f"{lab}, B=1")
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("context (k tokens)")
ax.set_ylabel("µs per layer step (device)")
ax.set_title("H100, Llama-3.1-8B layer decode step, bf16")
ax.grid(True, which="both", alpha=0.3)
ax.legend()
fig.tight_layout()
fig.savefig(d / "time_vs_context.png", dpi=120)

fig, ax = plt.subplots(figsize=(7, 4.5))
for kind, lab in [("dense_kernel", "dense kernel"), ("saap_kernel", "Saap kernel"), ("saap_step", "Saap whole step")]:
    for b in batches:
        ax.plot(xs, [tbs(get(kind, n, b)) for n in lens], "o-" if b == 1 else "s--", label=f"{lab}, B={b}")
ax.axhline(copy, color="k", ls=":", label=f"device copy {copy:.2f} TB/s")
ax.set_xscale("log", base=2)
ax.set_xlabel("context (k tokens)")
ax.set_ylabel("TB/s (bytes read / device time)")
ax.grid(True, alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(d / "bandwidth.png", dpi=120)

fig, ax = plt.subplots(figsize=(7, 4.5))
for b in batches:
    ax.plot(xs, [get("dense_step", n, b)["bytes"] / 1e6 for n in lens], "o-", label=f"dense, B={b}")
    ax.plot(xs, [get("saap_step", n, b)["bytes"] / 1e6 for n in lens], "s-", label=f"Saap (all counted), B={b}")
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("context (k tokens)")
ax.set_ylabel("MB read per layer step")
ax.grid(True, which="both", alpha=0.3)
ax.legend()
fig.tight_layout()
fig.savefig(d / "bytes_per_step.png", dpi=120)
print((d / "table.md").read_text())
