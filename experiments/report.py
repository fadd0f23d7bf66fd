"""Results table (markdown) and a bar plot (SVG, no plotting library) from a sweep folder.

    python experiments/report.py <sweep dir> --metric val/fid_best --rows model \
        --cols sampler,sampler.step_size --out experiments/imagenet64_block_ablation

Reads every job of the sweep (``.hydra/overrides.yaml``, ``metrics.json``, ``job_return.json``,
via ``ddlab.sweep.collect``), pivots ``metric`` into a table with one row per value of ``--rows``
and one column per combination of ``--cols`` (override keys), and writes ``results.md`` and
``results.svg`` into ``--out``. Failed or unfinished jobs show as ``failed`` / ``-``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ddlab.sweep import collect, parse_overrides


def pivot(rows, metric, row_key, col_keys):
    table, row_vals, col_vals = {}, [], []
    for r in rows:
        ov = parse_overrides(r["overrides"].split()) if r["overrides"] else {}
        rk = str(ov.get(row_key, "-"))
        ck = ", ".join(f"{k}={ov.get(k, '-')}" for k in col_keys) if col_keys else metric
        if rk not in row_vals:
            row_vals.append(rk)
        if ck not in col_vals:
            col_vals.append(ck)
        v = r.get(metric)
        table[rk, ck] = "failed" if r["status"] == "failed" else (float(v) if v not in (None, "") else None)
    return table, row_vals, col_vals


def fmt(v):
    return "-" if v is None else v if isinstance(v, str) else f"{v:.4g}"


def markdown(table, row_vals, col_vals, row_key, metric):
    lines = [f"{metric} (lower is better for losses and FID)", "",
             "| " + " | ".join([row_key] + col_vals) + " |", "|" + "---|" * (len(col_vals) + 1)]
    for rk in row_vals:
        lines.append("| " + " | ".join([rk] + [fmt(table.get((rk, ck))) for ck in col_vals]) + " |")
    return "\n".join(lines) + "\n"


def svg_bars(table, row_vals, col_vals, metric, width=720, height=360):
    vals = [v for v in table.values() if isinstance(v, float) and math.isfinite(v)]
    top = max(vals) * 1.1 if vals else 1.0
    left, bottom, plot_h = 60, 60, height - 100
    group_w = (width - left - 20) / max(1, len(row_vals))
    bar_w = group_w * 0.8 / max(1, len(col_vals))
    colours = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
           f'<text x="{left}" y="16">{metric}</text>',
           f'<line x1="{left}" y1="{height - bottom}" x2="{width - 10}" y2="{height - bottom}" stroke="black"/>']
    for gi, rk in enumerate(row_vals):
        x0 = left + gi * group_w + group_w * 0.1
        out.append(f'<text x="{x0}" y="{height - bottom + 16}">{rk}</text>')
        for ci, ck in enumerate(col_vals):
            v = table.get((rk, ck))
            if isinstance(v, float) and math.isfinite(v):
                h = plot_h * v / top
                out.append(f'<rect x="{x0 + ci * bar_w:.1f}" y="{height - bottom - h:.1f}" width="{bar_w * 0.95:.1f}" '
                           f'height="{h:.1f}" fill="{colours[ci % len(colours)]}"><title>{rk} {ck}: {v:.4g}</title></rect>')
    for ci, ck in enumerate(col_vals):
        y = height - 30 + 12 * (ci // 3)
        x = left + (ci % 3) * 220
        out.append(f'<rect x="{x}" y="{y - 9}" width="10" height="10" fill="{colours[ci % len(colours)]}"/>'
                   f'<text x="{x + 14}" y="{y}">{ck}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep_dir")
    p.add_argument("--metric", default="val/fid_best")
    p.add_argument("--rows", default="model", help="override key for the table rows")
    p.add_argument("--cols", default="", help="comma-separated override keys for the columns")
    p.add_argument("--out", default=None, help="folder for results.md / results.svg (default: the sweep folder)")
    a = p.parse_args(argv)
    rows = collect(a.sweep_dir)
    if not rows:
        raise SystemExit(f"{a.sweep_dir}: no jobs found (expected <job>/.hydra/overrides.yaml)")
    cols = [c for c in a.cols.split(",") if c]
    table, row_vals, col_vals = pivot(rows, a.metric, a.rows, cols)
    out = Path(a.out or a.sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(table, row_vals, col_vals, a.rows, a.metric)
    (out / "results.md").write_text(md)
    (out / "results.svg").write_text(svg_bars(table, row_vals, col_vals, a.metric))
    print(md)
    return table


if __name__ == "__main__":
    main()
