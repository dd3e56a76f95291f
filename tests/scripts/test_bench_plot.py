"""scripts/bench_plot.py: one SVG point per (panel, shape, impl) with a ratio to SDPA; reads the saved H200 log."""

import json
import math
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scripts import bench_plot  # noqa: E402

SVG = "{http://www.w3.org/2000/svg}"
LOG = ROOT / "docs" / "results" / "bench_ops_2026-12-01.log"


def _points(svg: str) -> list[dict]:
    root = ET.fromstring(svg)  # well-formed XML
    for el in root.iter():
        for k in ("x", "y", "cx", "cy", "x1", "y1", "x2", "y2"):
            if k in el.attrib:
                assert math.isfinite(float(el.attrib[k]))
    return [el.attrib for el in root.iter(f"{SVG}circle") if el.get("class") == "point"]


def _axis_labels(svg: str) -> list[str]:
    return [el.text for el in ET.fromstring(svg).iter(f"{SVG}text") if "rotate" in el.get("transform", "")]


def _fake_rows() -> list[dict]:
    rows = []
    for shape, times in [("A 1 (1, 2, 256, 8, 4)", {"SDPA flash": 1.0, "SDPA cuDNN": 0.5, "MHLA triton": 0.25}),
                         ("B 2 (1, 2, 1024, 8, 4)", {"SDPA flash": 2.0, "MHLA triton": 8.0, "linear attn": 1.0}),
                         ("Long (1, 2, 99999, 8, 4)", {"MHLA triton": 3.0, "linear attn": 4.0})]:
        for impl, t in times.items():
            rows.append(dict(shape=shape, impl=impl, tokens=int(shape.split(", ")[2]), fwd=t, fwdbwd=3 * t))
    rows.append(dict(shape="B 2 (1, 2, 1024, 8, 4)", impl="authors-style", tokens=1024, error="out of memory"))
    rows.append(dict(shape="A 1 (1, 2, 256, 8, 4)", impl="authors-style", tokens=256, fwd=0.75))  # no fwdbwd
    return rows


def test_one_point_per_ratio_and_no_sdpa_shapes_skipped():
    svg = bench_plot.noncausal_svg(_fake_rows(), "test env")
    pts = _points(svg)
    got = sorted((p["data-panel"], p["data-shape"].split(" (")[0], p["data-impl"]) for p in pts)
    panels = ("fwd", "fwdbwd")
    want = ([(p, "A 1", i) for p in panels for i in ("SDPA flash", "SDPA cuDNN", "MHLA triton")]
            + [(p, "B 2", i) for p in panels for i in ("SDPA flash", "MHLA triton", "linear attn")]
            + [("fwd", "A 1", "authors-style")])  # no fwdbwd time; the errored row has no time at all
    assert got == sorted(want)
    assert _axis_labels(svg) == ["A 1", "B 2"] * 2  # "Long" (no SDPA) is only named as not shown
    assert "not shown" in svg and "stroke-dasharray" in svg and "test env" in svg and "eager medians" in svg
    ys = {(p["data-panel"], p["data-shape"][:3], p["data-impl"]): float(p["cy"]) for p in pts}
    one = ys["fwd", "A 1", "SDPA cuDNN"]  # ratio 1 (best); SDPA flash 2, triton 0.5: log scale, up is slower
    assert ys["fwd", "A 1", "SDPA flash"] - one == pytest.approx(one - ys["fwd", "A 1", "MHLA triton"])
    assert ys["fwd", "B 2", "linear attn"] > ys["fwd", "B 2", "SDPA flash"] > ys["fwd", "B 2", "MHLA triton"]


def test_markdown_log_reads_the_h200_table():
    rows, env = bench_plot.rows_from_markdown(LOG.read_text())
    assert env.startswith("NVIDIA H200") and len(rows) == 58
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    assert [bench_plot.short_name(s) for s in shapes] == [
        "DeiT-T 224", "DiT-XL/2 256", "DiT-XL/2 512", "1K D128", "DiT-XL/2 1024", "4K", "16K", "Wan 480p", "126K"]
    first = rows[0]
    assert first == dict(shape="DeiT-T 224 (128, 3, 256, 64, 16)", impl="SDPA flash", tokens=256, fwd=0.060,
                         fwdbwd=0.404, gpu_fwdbwd=0.142, mem=0.07)
    shown, _, ratio = bench_plot.ratios(rows)
    assert len(shown) == 8 and "126K" not in " ".join(shown)  # SDPA not run at 126K
    triton = ratio["fwd", "DeiT-T 224 (128, 3, 256, 64, 16)", "MHLA triton"]
    assert round(triton, 2) == 1.45  # the table's "fwd / best SDPA" column
    assert len(_points(bench_plot.noncausal_svg(rows))) == 2 * sum(r["shape"] in shown for r in rows)


def test_markdown_error_suffix_and_json(tmp_path):
    text = ("### Non-causal (shape: B, H, N, D, blocks)\n\nMeasured with `x` on GPU Z, bf16. Medians.\n\n"
            "| shape | implementation | fwd ms | fwd+bwd ms |\n|---|---|---|---|\n"
            "| S (1, 2, 64, 8, 4) | SDPA | 1.000 | 2.000 |\n| S (1, 2, 64, 8, 4) | MHLA triton | 0.500 | - |\n"
            "| T (1, 2, 64, 8, 4) | MHLA triton (CUDA out of memory) | - | - |\n\n### Causal (chunked)\n\n"
            "| shape | implementation | fwd ms |\n|---|---|---|\n| C (B=1, T=8) | MHLA triton | 1.0 |\n")
    rows, env = bench_plot.rows_from_markdown(text)
    assert env == "GPU Z, bf16" and len(rows) == 3
    assert rows[1] == dict(shape="S (1, 2, 64, 8, 4)", impl="MHLA triton", tokens=64, fwd=0.5)
    assert rows[2]["impl"] == "MHLA triton" and rows[2]["error"] == "CUDA out of memory"
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(dict(environment="GPU Z", dtype="bf16", sections=[
        dict(title="Non-causal (shape: B, H, N, D, blocks)", rows=rows), dict(title="Causal (chunked)", rows=[])])))
    out = tmp_path / "out.svg"
    svg = bench_plot.main(["--from-json", str(path), "--out", str(out)])
    assert out.read_text() == svg and len(_points(svg)) == 3 and "GPU Z, bf16" in svg
