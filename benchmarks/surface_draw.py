"""The surface figures in a real browser: JSON size and chromium's time to draw them, the light figure against
the one the code made before (per-vertex hover strings, int32 faces), in the same run.

The subject is :mod:`nsd_surface_scale`'s real-size fixture (15,724 voxels, 227,000 native vertices a hemisphere,
NSD-format files); one pattern is projected through its map and drawn with the V1 and V2 outlines of its surface
labels as ``surface.surface_figure`` and ``surface.flat_figure`` ("new"). "old" is the same figure as the code
before issue 10 wrote it (:func:`legacy_json`: one hover string per vertex in ``text``, int32 faces, float64
outlines; checked once against the code of that commit: the same JSON but for float32 rounding of the outline
markers). A third figure per view, the same layout with one triangle (:func:`baseline_json`), gives what the
scene costs whatever its data. For each figure: the JSON size (what ``st.plotly_chart`` sends) and, in Debian's
chromium (playwright, software WebGL, never a downloaded browser), the time to ``JSON.parse`` it and the time to
draw it (``Plotly.newPlot`` resolved, then two animation frames), in a fresh page that has already loaded
plotly.js (the library's own load is printed once). The figures alternate, median of ``--repeats`` pages each;
a hover label is read back from each mesh figure (the pattern's value must be there).

    taskset -c 1 python benchmarks/surface_draw.py [--repeats 5] [--out figures.json]

The machine's other load shows in the times: compare old and new of one run (the ratio), not runs.
"""
from __future__ import annotations

import argparse
import base64
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from nsd_surface_scale import SHAPE, write_fixture  # noqa: E402

HEMIS = ("left", "right")
#: Debian's chromium, as tests/test_browser.py drives it (never a downloaded browser)
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
#: the page's JavaScript: parse the figure's JSON, draw it, wait two frames; [parse ms, draw ms]
DRAW_JS = """async (text) => {
    const t0 = performance.now();
    const fig = JSON.parse(text);
    const t1 = performance.now();
    await Plotly.newPlot('plot', fig.data, fig.layout);
    await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
    return [t1 - t0, performance.now() - t1];
}"""


def _typed(spec: dict, dtype: str) -> dict:
    """A plotly JSON typed array {"dtype", "bdata": base64} with its values cast to ``dtype`` ("i4", "f8", ...)."""
    values = np.frombuffer(base64.b64decode(spec["bdata"]), dtype=spec["dtype"]).astype(dtype)
    return {"dtype": dtype, "bdata": base64.b64encode(values.tobytes()).decode()}


def legacy_json(fig) -> str:
    """The JSON of the figure as the code before issue 10 made it from the same maps: each hemisphere mesh's hover
    as one string per vertex ("left 1234: weight 0.52" / "left 1234: no value (coverage < 0.5)") in ``text`` with
    ``hovertemplate="%{text}"``, int32 faces, float64 outline markers. Rewritten from the new figure's JSON (its
    ``customdata`` [vertex id, value] and hover template), so both show the same maps."""
    import plotly.io as pio

    spec = json.loads(fig.to_json())
    for trace in spec["data"]:
        if trace["type"] == "mesh3d" and trace.get("name") in HEMIS:
            hemi = trace["name"]
            label = re.fullmatch(rf"{hemi} %{{customdata\[0\]}}: (.*) %{{customdata\[1\]:\.3~g}}<extra></extra>",
                                 trace["hovertemplate"]).group(1)
            hover = np.frombuffer(base64.b64decode(trace.pop("customdata")["bdata"]), np.float32).reshape(-1, 2)
            trace["text"] = [f"{hemi} {int(i)}: {label} {x:.3g}" if np.isfinite(x)
                             else f"{hemi} {int(i)}: no value (coverage < 0.5)" for i, x in hover.tolist()]
            trace["hovertemplate"] = "%{text}<extra></extra>"
            for key in "ijk":
                trace[key] = _typed(trace[key], "i4")
        elif trace["type"] == "scatter3d":
            for key in "xyz":
                trace[key] = _typed(trace[key], "f8")
    return pio.to_json(spec, validate=False)  # plotly's own encoder, as fig.to_json()


def _hover(page) -> str:
    """The hover label plotly shows with the mouse over the chart, tried at a few points on the hemispheres (not
    the gap between them); '' when none shows one."""
    box = page.locator("#plot .gl-container canvas").first.bounding_box()
    for fy in (0.5, 0.4, 0.6):
        for fx in (0.3, 0.7, 0.4, 0.6):
            page.mouse.move(box["x"] + box["width"] * fx, box["y"] + box["height"] * fy)
            page.wait_for_timeout(300)
            label = page.evaluate("() => [...document.querySelectorAll('.hovertext')].map(e => e.textContent)"
                                  ".join(' | ')")
            if label:
                return label
    return ""


def baseline_json(fig) -> str:
    """The figure's layout with ONE triangle for a mesh: what drawing the scene costs whatever its data."""
    import plotly.graph_objects as go

    tri = go.Mesh3d(x=[0, 1, 0], y=[0, 0, 1], z=[0, 0, 0], i=[0], j=[1], k=[2], color="grey")
    return go.Figure(tri, layout=fig.layout).to_json()


def browser_times(texts: dict[str, str], repeats: int, workdir: Path) -> tuple[dict, dict, float]:
    """({name: [(parse s, draw s)] one per fresh page}, {name: a hover label}, plotly.js load s).

    The figures are drawn in turn (old and new alternate), each repeat in a new page of one chromium.
    """
    import plotly
    from playwright.sync_api import sync_playwright

    shutil.copy(Path(plotly.__file__).parent / "package_data" / "plotly.min.js", workdir / "plotly.min.js")
    html = workdir / "draw.html"
    html.write_text('<!doctype html><html><body><div id="plot" style="width:1200px;height:380px"></div>'
                    '<script src="plotly.min.js"></script></body></html>')
    times = {name: [] for name in texts}
    hovers, loads = {}, []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for _ in range(repeats):
                for name, text in texts.items():
                    page = browser.new_page(viewport={"width": 1400, "height": 900})
                    t0 = time.perf_counter()
                    page.goto(html.as_uri(), wait_until="load", timeout=300_000)
                    loads.append(time.perf_counter() - t0)
                    parse_ms, draw_ms = page.evaluate(DRAW_JS, text)
                    times[name].append((parse_ms / 1000, draw_ms / 1000))
                    if name not in hovers:
                        hovers[name] = _hover(page)
                    page.close()
        finally:
            browser.close()
    return times, hovers, statistics.median(loads)


def fixture_maps(root: Path) -> tuple[dict, dict]:
    """(surface maps {"left"/"right": float32 (10242,)}, outlines {"V1"/"V2": {hemi: bool (10242,)}}) of one
    random pattern of the real-size fixture subject written under ``root``, through its own transforms."""
    from brain_diffuser_core import nsd_surface

    paths, ijk, _ = write_fixture(root)
    smap = nsd_surface.build_surface_map(paths, ijk, SHAPE)
    outlines, _ = nsd_surface.roi_outlines(paths, smap, ["V1", "V2"], lambda name: np.zeros(len(ijk), bool))
    maps = smap.project(np.random.default_rng(1).normal(size=len(ijk)).astype(np.float32))
    covered = sum(int(np.isfinite(maps[h]).sum()) for h in HEMIS)
    print(f"fixture: {len(ijk):,} voxels, {covered:,} of 20,484 fsaverage5 vertices with a value, outlines V1, V2 "
          "(surface labels)")
    return maps, outlines


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="fresh pages per figure (median)")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args(argv)

    from brain_diffuser_core import surface

    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        maps, outlines = fixture_maps(tmp / "nsd")
        surface.surface_figure({h: np.zeros_like(v) for h, v in maps.items()})  # warm-up: nilearn, the meshes
        texts = {}
        for view, draw in (("surface", surface.surface_figure), ("flat", surface.flat_figure)):
            t0 = time.perf_counter()
            fig = draw(maps, outlines=outlines, value_label="z")
            texts[f"{view} new"] = fig.to_json()
            t_new = time.perf_counter() - t0
            texts[f"{view} old"] = legacy_json(fig)
            texts[f"{view} one-triangle"] = baseline_json(fig)
            res[f"{view}_server_s"] = round(t_new, 2)
            for age in ("old", "new"):
                res[f"{view}_{age}_json_MB"] = round(len(texts[f"{view} {age}"]) / 1e6, 3)
            print(f"{view}: JSON old {res[f'{view}_old_json_MB']:.3f} MB, new {res[f'{view}_new_json_MB']:.3f} MB "
                  f"({len(texts[f'{view} old']) / len(texts[f'{view} new']):.2f}x smaller); new figure + JSON "
                  f"{t_new:.2f} s server side (nilearn's colours included, first draw of this pattern)")
        times, hovers, load = browser_times(texts, args.repeats, tmp)
        res["plotly_js_load_s"] = round(load, 2)
        print(f"chromium: page with plotly.js loaded in {load:.2f} s (median), before each figure")
        for view in ("surface", "flat"):
            med = {}
            for age in ("old", "new", "one-triangle"):
                parse = statistics.median(t[0] for t in times[f"{view} {age}"])
                draw = statistics.median(t[1] for t in times[f"{view} {age}"])
                med[age] = parse + draw
                res.update({f"{view}_{age}_parse_s": round(parse, 3), f"{view}_{age}_draw_s": round(draw, 3),
                            f"{view}_{age}_hover": hovers[f"{view} {age}"]})
                print(f"  {view} {age}: JSON.parse {parse * 1000:.0f} ms + draw {draw:.2f} s (median of "
                      f"{len(times[f'{view} {age}'])}); a hover: {hovers[f'{view} {age}']!r}")
            res[f"{view}_old_over_new"] = round(med["old"] / med["new"], 2)
            print(f"  {view}: old / new (parse + draw) = {med['old'] / med['new']:.2f}; the data's own share: old "
                  f"{med['old'] - med['one-triangle']:.2f} s, new {med['new'] - med['one-triangle']:.2f} s over the "
                  "one-triangle scene")
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
