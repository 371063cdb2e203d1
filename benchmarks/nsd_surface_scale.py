"""The voxel -> fsaverage5 map at NSD's real size: build time, size on disk, and the time to draw a pattern.

A fixture subject of real size is written in NSD's formats (func1pt8mm volume 81 x 104 x 83 with 15,724
nsdgeneral voxels, as subject 1; 227,000 native vertices a hemisphere, three depth files each, 163,842-row
white-to-fsaverage index files, a prf-visualrois surface label). Its native-vertex coordinates are synthetic:
30 % of the vertices sample near nsdgeneral voxels (a random voxel centre + up to +-1 voxel of jitter per
depth), 65 % elsewhere in the volume, 5 % are 9999. Then, in one run:

1. build the map from the files (``nsd_surface.build_surface_map``, no cache): median of ``--repeats``;
2. the cache: first ``load_surface_map`` (build + write), its npz size on disk, and a cached load (ratio against
   the build: what the cache saves);
3. project a pattern (``SurfaceMap.project``) and draw it server side: ``surface.surface_figure`` and
   ``surface.flat_figure`` with two ROI outlines, plus ``fig.to_json()`` (what ``st.plotly_chart`` sends), each
   with a new pattern (so nilearn's colour cache never hits), median of ``--repeats``.

The figures in a browser (chromium's draw time, old figure against new): ``benchmarks/surface_draw.py``.

    python benchmarks/nsd_surface_scale.py [--repeats 3] [--out figures.json]

Run it under ``taskset -c 1``: the figures printed are for that one core.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = (81, 104, 83)
N_VOXELS = 15724
N_NATIVE = 227_000


def write_fixture(root: Path, seed: int = 0):
    """Write the real-size subject; returns (NSDPaths, voxel_ijk (15724, 3), seconds)."""
    from brain_diffuser_core.nsd_format import (LAYERS, NSD_HEMIS, NSDPaths, write_label_volume, write_layer_coords,
                                                write_surface_label, write_white_to_fsaverage)

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    paths = NSDPaths(root, 1)
    # nsdgeneral: the 15,724 voxels of a posterior shell nearest a random smooth surface (an occipital sheet)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), -1).reshape(-1, 3).astype(float)
    centre = np.array([40.0, 25.0, 35.0])
    r = np.linalg.norm((grid - centre) / [1.0, 1.3, 1.0], axis=1)
    score = np.abs(r - 30.0) + 0.3 * rng.random(len(grid)) + 3 * (grid[:, 1] > 55)
    ijk = grid[np.argsort(score)[:N_VOXELS]].astype(np.int64)
    ijk = ijk[np.lexsort((ijk[:, 2], ijk[:, 1], ijk[:, 0]))]
    vol = np.zeros(SHAPE, np.int16)
    vol[tuple(ijk.T)] = 1
    affine = np.diag([1.8, 1.8, 1.8, 1.0])
    write_label_volume(paths.nsdgeneral, vol, affine)
    left = ijk[:, 0] < 40
    for hemi, h in NSD_HEMIS.items():
        mine = ijk[left if hemi == "left" else ~left]
        hv = np.where(vol > 0, -1, 0).astype(np.int16)
        hv[tuple(mine.T)] = 1
        write_label_volume(paths.hemi_nsdgeneral(h), hv, affine)
        near = rng.random(N_NATIVE) < 0.30
        base = np.where(near[:, None], mine[rng.integers(0, len(mine), N_NATIVE)].astype(float),
                        rng.uniform(0, np.array(SHAPE) - 1, (N_NATIVE, 3)))
        invalid = rng.random(N_NATIVE) < 0.05
        for layer in LAYERS:
            c = np.clip(base + rng.uniform(-1, 1, base.shape), 0, np.array(SHAPE) - 1) + 1.0  # 1-based
            c[invalid] = 9999.0
            write_layer_coords(paths.layer_coords(h, layer), c)
        write_white_to_fsaverage(paths.white_to_fsaverage(h), rng.integers(1, N_NATIVE + 1, 163842))
        write_surface_label(paths.surface_label(h, "prf-visualrois"), np.where(near, rng.integers(0, 8, N_NATIVE), 0),
                            {1: "V1v", 2: "V1d", 3: "V2v", 4: "V2d", 5: "V3v", 6: "V3d", 7: "hV4"})
    return paths, ijk, time.perf_counter() - t0


def _median_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for k in range(repeats):
        t0 = time.perf_counter()
        out = fn(k)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args(argv)

    from brain_diffuser_core import nsd_surface, surface

    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths, ijk, t_write = write_fixture(tmp / "nsd")
        files = [p for f in nsd_surface.transform_files(paths).values() for p in f.values()]
        res["fixture"] = {"voxels": len(ijk), "native_vertices_per_hemisphere": N_NATIVE, "write_s": round(t_write, 2),
                          "transform_files_MB": round(sum(p.stat().st_size for p in files) / 1e6, 2)}
        print(f"fixture: {len(ijk):,} voxels, {N_NATIVE:,} native vertices a hemisphere, 8 transform files "
              f"{res['fixture']['transform_files_MB']} MB (gzipped MGH), written in {t_write:.1f} s")

        t_build, smap = _median_time(lambda k: nsd_surface.build_surface_map(paths, ijk, SHAPE), args.repeats)
        nnz = sum(smap.weights[h].nnz for h in ("left", "right"))
        covered = sum(int(smap.covered(h).sum()) for h in ("left", "right"))
        res["build_s"] = round(t_build, 3)
        print(f"build the map (no cache): {t_build:.2f} s (median of {args.repeats}); {nnz:,} weights, "
              f"{covered:,} of 20,484 fsaverage5 vertices covered >= 0.5")

        cache = tmp / "cache"
        t0 = time.perf_counter()
        nsd_surface.load_surface_map(paths, ijk, SHAPE, cache_dir=cache)
        t_first = time.perf_counter() - t0
        (npz,) = list(cache.glob("*.npz"))
        t_cached, _ = _median_time(lambda k: nsd_surface.load_surface_map(paths, ijk, SHAPE, cache_dir=cache),
                                   args.repeats)
        res.update(first_load_s=round(t_first, 3), cache_MB=round(npz.stat().st_size / 1e6, 3),
                   cached_load_s=round(t_cached, 4), build_over_cached=round(t_build / t_cached, 1))
        print(f"cache: first load (build + write) {t_first:.2f} s, npz on disk {npz.stat().st_size / 1e6:.2f} MB, "
              f"cached load {t_cached * 1000:.1f} ms = {t_build / t_cached:.0f}x faster than building")

        rng = np.random.default_rng(1)
        patterns = [rng.normal(size=len(ijk)).astype(np.float32) for _ in range(3 * args.repeats + 1)]
        t_proj, maps = _median_time(lambda k: smap.project(patterns[k]), args.repeats)
        outlines, notes = nsd_surface.roi_outlines(paths, smap, ["V1", "V2"], lambda name: np.zeros(len(ijk), bool))
        surface.surface_figure(smap.project(patterns[-1]), outlines=outlines)  # warm-up: nilearn, meshes
        res["project_ms"] = round(t_proj * 1000, 2)
        print(f"project a pattern: {t_proj * 1000:.2f} ms")
        for offset, (name, draw) in enumerate((("surface", surface.surface_figure), ("flat", surface.flat_figure))):
            # a pattern never drawn before each time (offset): nilearn's colour cache never hits
            start = (offset + 1) * args.repeats
            t_fig, fig = _median_time(lambda k: draw(smap.project(patterns[start + k]), outlines=outlines),
                                      args.repeats)
            t_json, text = _median_time(lambda k: fig.to_json(), args.repeats)
            res[f"{name}_figure_s"], res[f"{name}_json_s"] = round(t_fig, 3), round(t_json, 3)
            res[f"{name}_json_MB"] = round(len(text) / 1e6, 2)
            print(f"draw server side, {name}: figure {t_fig:.2f} s + to_json {t_json:.2f} s "
                  f"({len(text) / 1e6:.1f} MB of JSON), with 2 ROI outlines")
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
