"""Non-causal `bench_ops.py` rows -> SVG: each implementation's time over the best SDPA backend of its shape.

    python scripts/bench_plot.py --from-json rows.json --out docs/img/ops_ratio.svg
    python scripts/bench_plot.py --from-markdown docs/results/bench_ops_2026-12-01.log --out docs/img/ops_ratio.svg

`--from-json` reads `bench_ops.py --json`; `--from-markdown` reads the non-causal table that bench_ops prints
(its log, or docs/benchmarks.md). Two panels (forward, forward+backward), the eager medians of the table's
"fwd ms" / "fwd+bwd ms" columns, log y axis. Shapes without an SDPA time (very long sequences) are left out.
No third-party dependency.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

PANELS = (("fwd", "forward"), ("fwdbwd", "forward + backward"))
COLORS = {"SDPA flash": "#7f7f7f", "SDPA cuDNN": "#17becf", "SDPA": "#7f7f7f", "linear attn (torch)": "#1f77b4",
          "authors-style (torch.compile)": "#9467bd", "authors-style": "#9467bd",
          "MHLA reference (torch)": "#ff7f0e", "MHLA triton, state path": "#2ca02c", "MHLA triton": "#d62728"}
OTHER_COLORS = ("#8c564b", "#e377c2", "#bcbd22", "#000000")
# markdown column -> row key, as bench_ops.table writes them
COLUMNS = {"shape": "shape", "implementation": "impl", "fwd ms": "fwd", "fwd+bwd ms": "fwdbwd",
           "GPU kernels fwd+bwd ms": "gpu_fwdbwd", "peak extra GiB": "mem"}


def best_sdpa(rows: list[dict], shape: str, key: str) -> float | None:
    """The fastest SDPA backend's `key` time at `shape`, None when no SDPA row has one."""
    times = [r[key] for r in rows if r["shape"] == shape and r["impl"].startswith("SDPA") and r.get(key)]
    return min(times) if times else None


def short_name(shape: str) -> str:
    """'DiT-XL/2 256 (32, 16, 256, 72, 16)' -> 'DiT-XL/2 256'."""
    return shape.split(" (")[0]


def ratios(rows: list[dict]) -> tuple[list[str], list[str], dict[tuple[str, str, str], float]]:
    """Shapes with an SDPA time, implementations, and {(key, shape, impl): time / best SDPA time}."""
    out: dict[tuple[str, str, str], float] = {}
    for key, _ in PANELS:
        for r in rows:
            best = best_sdpa(rows, r["shape"], key)
            value = r.get(key)
            if best and value and math.isfinite(value / best) and value > 0:
                out[key, r["shape"], r["impl"]] = value / best
    shapes = [s for s in dict.fromkeys(r["shape"] for r in rows) if any(k[1] == s for k in out)]
    impls = [i for i in dict.fromkeys(r["impl"] for r in rows) if any(k[2] == i for k in out)]
    return shapes, impls, out


def _ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks (decades only for a wide range) covering [lo, hi]."""
    steps = (1,) if math.log10(hi / lo) > 3 else (1, 2, 5)
    ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
             for m in steps]
    below = [t for t in ticks if t <= lo * (1 + 1e-9)]
    above = [t for t in ticks if t >= hi * (1 - 1e-9)]
    return [t for t in ticks if below[-1] <= t <= above[0]]


def noncausal_svg(rows: list[dict], note: str = "") -> str:
    """SVG text: per shape (x, categorical) each implementation's time / best SDPA (y, log); `note` goes under
    the title (e.g. the environment)."""
    rows = [r for r in rows if "T=" not in r["shape"]]  # causal shapes are named (B=.., T=..)
    shapes, impls, ratio = ratios(rows)
    dropped = [short_name(s) for s in dict.fromkeys(r["shape"] for r in rows) if s not in shapes]
    PW, PH, left, gap, top, bottom, legend_w = 440, 300, 50, 40, 62, 96, 220
    width, height = left + 2 * PW + gap + legend_w, top + PH + bottom
    ticks = _ticks(min([0.5, *ratio.values()]), max([2.0, *ratio.values()]))  # at least 0.5 to 2
    pad = 0.03 * math.log10(ticks[-1] / ticks[0])  # keeps points off the frame
    lo, hi = math.log10(ticks[0]) - pad, math.log10(ticks[-1]) + pad
    colors, spare = {}, iter(OTHER_COLORS * len(impls))
    for impl in impls:
        colors[impl] = COLORS.get(impl) or next(spare)

    def y(v: float) -> float:
        return top + (hi - math.log10(v)) / (hi - lo) * PH

    title = "Non-causal attention: time / best SDPA backend of the same shape (lower is faster)"
    sub = "eager medians (the table's fwd ms and fwd+bwd ms columns), log scale" + (f"; {note}" if note else "")
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{left}" y="18" font-size="14" font-weight="bold">{escape(title)}</text>',
             f'<text x="{left}" y="34" fill="#444">{escape(sub)}</text>']
    band = PW / max(len(shapes), 1)
    for p, (key, label) in enumerate(PANELS):
        ox = left + p * (PW + gap)
        parts.append(f'<text x="{ox + PW / 2}" y="{top - 8}" text-anchor="middle" font-weight="bold">'
                     f'{escape(label)}</text>')
        for t in ticks:
            parts.append(f'<line x1="{ox}" y1="{y(t):.1f}" x2="{ox + PW}" y2="{y(t):.1f}" stroke="#e5e5e5"/>')
            parts.append(f'<text x="{ox - 4}" y="{y(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
        parts.append(f'<line x1="{ox}" y1="{y(1):.1f}" x2="{ox + PW}" y2="{y(1):.1f}" stroke="#333" '
                     'stroke-dasharray="5,4"/>')
        parts.append(f'<rect x="{ox}" y="{top}" width="{PW}" height="{PH}" fill="none" stroke="#999"/>')
        for i, s in enumerate(shapes):
            cx = ox + (i + 0.5) * band
            parts.append(f'<line x1="{cx:.1f}" y1="{top + PH}" x2="{cx:.1f}" y2="{top + PH + 4}" stroke="#999"/>')
            parts.append(f'<text x="{cx:.1f}" y="{top + PH + 14}" text-anchor="end" '
                         f'transform="rotate(-35 {cx:.1f} {top + PH + 14})">{escape(short_name(s))}</text>')
        for j, impl in enumerate(impls):
            dx = (j - (len(impls) - 1) / 2) * min(band * 0.7 / len(impls), 6)
            pts = [(ox + (i + 0.5) * band + dx, ratio.get((key, s, impl)), s) for i, s in enumerate(shapes)]
            for run in _runs(pts):  # a line through consecutive shapes only
                if len(run) > 1:
                    parts.append(f'<polyline fill="none" stroke={quoteattr(colors[impl])} stroke-opacity="0.45" '
                                 'points="' + " ".join(f"{x:.1f},{y(v):.1f}" for x, v, _ in run) + '"/>')
            for x, v, s in pts:
                if v is not None:
                    parts.append(f'<circle class="point" cx="{x:.1f}" cy="{y(v):.1f}" r="3.5" '
                                 f'fill={quoteattr(colors[impl])} data-panel="{key}" data-shape={quoteattr(s)} '
                                 f'data-impl={quoteattr(impl)}><title>{escape(f"{short_name(s)}, {impl}: {v:.2f}")}'
                                 '</title></circle>')
    lx = left + 2 * PW + gap + 16
    for j, impl in enumerate(impls):
        ly = top + 8 + 18 * j
        parts.append(f'<circle cx="{lx}" cy="{ly}" r="4" fill={quoteattr(colors[impl])}/>')
        parts.append(f'<text x="{lx + 10}" y="{ly + 4}">{escape(impl)}</text>')
    ly = top + 8 + 18 * len(impls) + 10
    parts.append(f'<line x1="{lx - 6}" y1="{ly}" x2="{lx + 6}" y2="{ly}" stroke="#333" stroke-dasharray="5,4"/>')
    parts.append(f'<text x="{lx + 10}" y="{ly + 4}">1.0 = best SDPA</text>')
    if dropped:
        parts.append(f'<text x="{lx - 6}" y="{ly + 24}" fill="#444">not shown (no SDPA time):</text>')
        parts.append(f'<text x="{lx - 6}" y="{ly + 38}" fill="#444">{escape(", ".join(dropped))}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _runs(pts: list[tuple]) -> list[list[tuple]]:
    """Split (x, value, shape) points into runs of consecutive non-None values."""
    runs: list[list[tuple]] = [[]]
    for pt in pts:
        if pt[1] is None:
            runs.append([])
        else:
            runs[-1].append(pt)
    return [r for r in runs if r]


def rows_from_json(path: str | Path) -> tuple[list[dict], str]:
    """The non-causal rows and the environment string of a `bench_ops.py --json` file."""
    data = json.loads(Path(path).read_text())
    rows = [r for sec in data["sections"] if sec["title"].startswith("Non-causal") for r in sec["rows"]]
    return rows, ", ".join(x for x in (data.get("environment"), data.get("dtype")) if x)


def rows_from_markdown(text: str) -> tuple[list[dict], str]:
    """The rows of the table under the `### Non-causal` heading of bench_ops' markdown output, and the
    environment named by the log's first `# ` line or the section's 'Measured with ... on ENV. Medians.'"""
    first = text.splitlines()[0] if text else ""
    env = first[2:].strip() if first.startswith("# ") else ""
    start = re.search(r"^### Non-causal.*$", text, re.M)
    if start is None:
        raise ValueError("no '### Non-causal' section")
    section = re.split(r"^#{1,3} ", text[start.end():], maxsplit=1, flags=re.M)[0]
    measured = re.search(r"Measured with .* on (.*)\. Medians\.", section)
    env = measured.group(1) if measured else env
    table = [line.strip() for line in section.splitlines() if line.strip().startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    rows = []
    for line in table[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        row = {COLUMNS[h]: c for h, c in zip(header, cells) if h in COLUMNS and c != "-"}
        row.update({k: float(v) for k, v in row.items() if k not in ("shape", "impl")})
        dims = re.search(r"\(([\d, ]+)\)$", row["shape"])
        if dims:  # (B, H, N, D, blocks)
            row["tokens"] = int(dims.group(1).split(",")[2])
        rows.append(row)
    names = {r["impl"] for r in rows}
    for r in rows:  # the table writes an error as "impl (error)"
        known = [n for n in names if r["impl"].startswith(n + " (") and r["impl"].endswith(")")]
        if known:
            name = max(known, key=len)
            r["impl"], r["error"] = name, r["impl"][len(name) + 2:-1]
    return rows, env


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-json", help="a file written by bench_ops.py --json")
    src.add_argument("--from-markdown", help="bench_ops.py's printed output or a markdown file with its tables")
    ap.add_argument("--out", required=True, help="the SVG file to write")
    args = ap.parse_args(argv)
    if args.from_json:
        rows, env = rows_from_json(args.from_json)
    else:
        rows, env = rows_from_markdown(Path(args.from_markdown).read_text())
    svg = noncausal_svg(rows, env)
    Path(args.out).write_text(svg)
    points = svg.count('class="point"')
    print(f"wrote {args.out}: {points} points from {len(rows)} rows")
    return svg


if __name__ == "__main__":
    main()
