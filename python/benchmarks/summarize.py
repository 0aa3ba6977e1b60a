#!/usr/bin/env python3
"""Markdown tables of the figures that ``figures.sh`` wrote: the load script's runs (median, with the
range in brackets, per backend and user count) and the per-call overhead (medians of the rounds).

    python summarize.py target/python-bench/runs.jsonl target/python-bench/overhead.jsonl
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from typing import Any


def cell(values: list[float], digits: int = 1) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:,.{digits}f}"
    return f"{med:,.{digits}f} ({min(values):,.{digits}f}–{max(values):,.{digits}f})"


def main() -> None:
    runs_path, overhead_path = sys.argv[1], sys.argv[2]
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    with open(runs_path) as f:
        for line in f:
            if line.strip():
                run = json.loads(line)
                groups[run["label"]].append(run)
    print(
        "| backend, users × messages | runs | messages/s | p50 ms | p95 ms | p99 ms | max ms "
        "| succeeded | lost updates | stale reads | foreign answers | errors |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for label in sorted(groups, key=lambda s: (int(s.split()[1]), s.split()[0] != "scaled")):
        rs = groups[label]
        errors: dict[str, int] = defaultdict(int)
        for r in rs:
            for k, v in r["errors"].items():
                errors[k] += v
        print(
            f"| {label.split()[0]}, {rs[0]['users']} × {rs[0]['messages']} | {len(rs)} "
            f"| {cell([r['messages_per_s'] for r in rs], 0)} "
            f"| {cell([r['p50_ms'] for r in rs])} | {cell([r['p95_ms'] for r in rs])} "
            f"| {cell([r['p99_ms'] for r in rs])} | {cell([r['max_ms'] for r in rs], 0)} "
            f"| {sum(r['successful_messages'] for r in rs)}/{sum(r['total_messages'] for r in rs)} "
            f"| {sum(r['lost_updates'] for r in rs)} | {sum(r['stale_counters'] for r in rs)} "
            f"| {sum(r['foreign_responses'] + r['foreign_states'] for r in rs)} "
            f"| {dict(errors) or '-'} |"
        )
    print()
    with open(overhead_path) as f:
        rounds = [json.loads(line) for line in f if line.strip()]
    per_round = [r for r in rounds if "round" in r]
    print("| client, one GET at a time | µs per call, median (range) of rounds |")
    print("|---|---:|")
    for name in (k for k in per_round[0] if k != "round"):
        print(f"| {name} | {cell([r[name] for r in per_round])} |")


if __name__ == "__main__":
    main()
