#!/usr/bin/env python3
"""Summary table of evaluate's report.json files: means over all layers of the indexed-mass
columns, and perplexity x dense. Usage: summarize.py DIR... (each holding a report.json)."""
import json
import sys

print("| setting | C | ℓ | cap (perfect classifier, top-ℓ) | its keys read | cap at Saap's keys | top-k at Saap's keys | Saap indexed recall | Saap keys read | Saap / cap at its keys | NC indexed recall | ppl Saap × dense | cap at Saap's keys, partitions × 1024-position blocks |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for d in sys.argv[1:]:
    r = json.load(open(f"{d}/report.json"))
    L = r["layers"]
    m = lambda f: sum(f(l) for l in L) / len(L)
    s = lambda k: m(lambda l: l["saap"].get(k, 0.0))
    ppl = {x["mode"]: x["perplexity"] for x in r["decode"]}
    ratio = f"{ppl['Saap'] / ppl['Dense']:.3f}" if "Saap" in ppl else "-"
    cap_m = s("partition_oracle_matched_indexed_recall")
    b = s("partition_block_oracle_matched_indexed_recall")
    blk = f"{b:.3f}" if b else "-"
    print(f"| {d.rstrip('/').split('/')[-1]} | {r['n_partitions']} | {r['n_probe']} "
          f"| {s('partition_oracle_indexed_recall'):.3f} | {100 * s('partition_oracle_indexed_selectivity'):.1f}% "
          f"| {cap_m:.3f} | {s('oracle_indexed_recall'):.3f} "
          f"| {s('indexed_recall'):.3f} | {100 * s('indexed_selectivity'):.1f}% "
          f"| {s('indexed_recall') / max(cap_m, 1e-9):.2f} "
          f"| {m(lambda l: l['nearest_centroid']['indexed_recall']):.3f} | {ratio} "
          f"| {blk} |")
