"""Markdown tables from a benchmark result JSON: ``python benchmarks/report.py result.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown(result: dict) -> str:
    m, before = result["machine"], result["load_before"]
    after = result.get("load_after", before)
    lines = [
        f"Machine: {m['cpu_model']}, {m['nproc']} CPUs, native bf16: {m['native_bf16']}, "
        f"torch {m['torch']}, openvino {m['versions'].get('openvino')}, "
        f"diffusers {m['versions'].get('diffusers')}",
        f"Load average before/after: {before['loadavg_1_5_15'][0]:.1f} / "
        f"{after['loadavg_1_5_15'][0]:.1f}" + (
            "  (LOADED MACHINE: compare ratios within a suite, not absolute times)"
            if max(before["loadavg_1_5_15"][0], after["loadavg_1_5_15"][0]) > m["nproc"] / 2
            else ""),
        f"OMP_WAIT_POLICY: {result['args'].get('omp_wait_policy', 'default')}",
    ]
    for suite, rows in result["results"].items():
        base = next((r for r in rows if r.get("label") == "eager" and "median_s" in r), None)
        lines += ["", f"### {suite}", "",
                  "| contender | precision | median s | vs eager | first call s | peak RSS MB "
                  "| max abs err | rel L2 err |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['label']} | failed: {r['error'].splitlines()[-1][:80]} "
                             "| | | | | | |")
                continue
            speed = base["median_s"] / r["median_s"] if base else None
            lines.append(
                f"| {r['label']} | {r['precision']} | {r['median_s']:.2f} | "
                f"{_f(speed, '.2f')}x | {r['first_call_s']:.1f} | {r['peak_rss_mb']:.0f} | "
                f"{_f(r.get('max_abs'), '.1e')} | {_f(r.get('rel_l2'), '.1e')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(json.loads(Path(sys.argv[1]).read_text())))
