#!/usr/bin/env python3
"""Kernel durations of an ncu raw-page CSV (`ncu --import R --csv --page raw`) grouped by the
routing of the layer they ran in: each decode kernel (and its combine) is labelled by the routing
kernels launched since the previous decode kernel (Quest, classifier, none = dense or window only).
Prints per label and kernel family: launches, mean and total µs.

Usage: ncu_layers.py FILE.csv"""
import csv
import re
import sys
from collections import defaultdict


def family(name):
    """Kernel name without its dtype/shape suffix."""
    for stem in ("saap_quest_scores", "saap_quest_top", "saap_route_hidden", "saap_route_out",
                 "saap_route_top", "saap_decode_combine", "saap_decode_est", "saap_decode_fused",
                 "saap_decode", "saap_rope_write"):
        if name.startswith(stem):
            return stem
    return re.sub(r"_(f32|bf16|f16).*", "", name)


def main(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    head = rows[0]
    name_at = head.index("Kernel Name")
    time_at = head.index("gpu__time_duration.sum")
    unit = rows[1][time_at]
    scale = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3}.get(unit, 1.0)
    stats = defaultdict(lambda: [0, 0.0])
    routing, label = set(), "none"
    for row in rows[2:]:
        if len(row) <= max(name_at, time_at) or not row[time_at]:
            continue
        kind = family(row[name_at])
        us = float(row[time_at].replace(",", "")) * scale
        if kind.startswith("saap_quest"):
            routing.add("quest")
        elif kind.startswith("saap_route"):
            routing.add("classifier")
        if kind in ("saap_decode", "saap_decode_est", "saap_decode_fused"):
            label = "+".join(sorted(routing)) or "none"
            routing = set()
        key = (label if kind.startswith("saap_decode") else "+".join(sorted(routing)) or "-", kind)
        stats[key][0] += 1
        stats[key][1] += us
    print("label | kernel | launches | mean µs | total µs")
    for (label, kind), (n, total) in sorted(stats.items()):
        print(f"{label} | {kind} | {n} | {total / n:.2f} | {total:.1f}")


if __name__ == "__main__":
    main(sys.argv[1])
