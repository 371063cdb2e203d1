"""brain_diffuser_core.nsd_surface on NSD-format fixtures: transform files written in NSD's real formats
(gzipped big-endian float32 MGH, 1-based coordinates, 9999 invalid markers), answers computed independently
here (a plain loop over vertices, depths and corners; closed-form linear patterns)."""
from __future__ import annotations

import gzip
import io
import itertools
import os

import nibabel as nib
import numpy as np
import pytest

from brain_diffuser_core import nsd_surface as ns
from brain_diffuser_core.nsd import NSDFormatError
from brain_diffuser_core.nsd_format import (
    NSDPaths,
    write_label_volume,
    write_layer_coords,
    write_mgh,
    write_surface_label,
    write_white_to_fsaverage,
)

SHAPE = (8, 9, 7)
N5 = 10242
N_FS = 163842
HEMIS = {"left": "lh", "right": "rh"}


def _mask(rng) -> np.ndarray:
    """bool SHAPE: the interior block minus a few holes, plus voxel (0, 0, 0) and the far corner voxel."""
    m = np.zeros(SHAPE, bool)
    m[1:-1, 1:-1, 1:-1] = True
    holes = rng.integers(1, np.array(SHAPE) - 1, (6, 3))
    m[tuple(holes.T)] = False
    m[0, 0, 0] = m[-1, -1, -1] = True
    return m


def _write_subject(root, rng, n_native=(300, 260), coords=None, w2f=None):
    """Write a subject's transforms; returns (paths, voxel_ijk, coords {hemi: {layer: (V, 3)}}, w2f {hemi: (163842,)})."""
    paths = NSDPaths(root, 1)
    mask = _mask(rng)
    ijk = np.argwhere(mask)
    coords = coords or {}
    w2f = w2f or {}
    for (hemi, h), n in zip(HEMIS.items(), n_native):
        if hemi not in coords:
            # 1-based coordinates over the whole volume (some near the border: partial coverage), 9999 rows
            c = {layer: rng.uniform(1.0, np.array(SHAPE, float), (n, 3)) for layer in ns.LAYERS}
            for layer in ns.LAYERS:
                c[layer][rng.random(n) < 0.1] = 9999.0
            coords[hemi] = c
        if hemi not in w2f:
            w2f[hemi] = rng.integers(1, n + 1, N_FS)
        for layer in ns.LAYERS:
            write_layer_coords(paths.layer_coords(h, layer), coords[hemi][layer])
        write_white_to_fsaverage(paths.white_to_fsaverage(h), w2f[hemi])
    return paths, ijk, coords, w2f


def _naive(coords, w2f, ijk, pattern, vertices):
    """At the given fsaverage5 vertices: (value or nan, coverage), by loops (NSD's rule written out the slow way)."""
    index = {tuple(v): k for k, v in enumerate(ijk.tolist())}
    values, cover = np.full(len(vertices), np.nan), np.zeros(len(vertices))
    for out, v in enumerate(vertices):
        native = int(round(w2f[v])) - 1
        total = weight = 0.0
        for layer in ns.LAYERS:
            c = coords[layer][native]
            if np.any(c == 9999) or not np.all(np.isfinite(c)):
                continue
            c = c - 1.0
            if np.any(c < 0) or np.any(c > np.array(SHAPE) - 1):
                continue
            base = np.floor(c).astype(int)
            f = c - base
            for d in itertools.product((0, 1), repeat=3):
                corner = tuple(int(x) for x in base + np.array(d))
                w = np.prod([f[a] if d[a] else 1 - f[a] for a in range(3)])
                if w > 0 and corner in index:
                    total += w / 3 * pattern[index[corner]]
                    weight += w / 3
        cover[out] = weight
        if weight >= 0.5:
            values[out] = total / weight
    return values, cover


def test_the_map_matches_a_naive_loop(tmp_path, rng):
    paths, ijk, coords, w2f = _write_subject(tmp_path, rng)
    smap = ns.build_surface_map(paths, ijk, SHAPE)
    pattern = rng.normal(size=len(ijk))
    got = smap.project(pattern)
    for hemi in HEMIS:
        vertices = rng.choice(N5, 1500, replace=False)  # the loop is slow: a random sample of the vertices
        want, cover = _naive(coords[hemi], w2f[hemi], ijk, pattern, vertices)
        np.testing.assert_allclose(smap.coverage[hemi][vertices], cover, atol=1e-5)
        np.testing.assert_array_equal(np.isnan(got[hemi][vertices]), np.isnan(want))
        ok = ~np.isnan(want)
        assert 0.2 < ok.mean() < 0.95  # a mix of covered and uncovered vertices
        np.testing.assert_allclose(got[hemi][vertices][ok], want[ok], atol=1e-4)
        assert smap.weights[hemi].shape == (N5, len(ijk)) and smap.weights[hemi].dtype == np.float32
        assert smap.n_native[hemi] == len(coords[hemi]["layerB1"])


def test_a_linear_pattern_is_reproduced_exactly_where_coverage_is_1(tmp_path, rng):
    n = 400
    # coordinates whose 8 corners all lie inside the interior block (1-based 2 .. dim-1), some in holes' cells
    inner = {layer: rng.uniform(2.0, np.array(SHAPE, float) - 1.0, (n, 3)) for layer in ns.LAYERS}
    paths, ijk, coords, _ = _write_subject(tmp_path, rng, coords={"left": inner, "right": inner},
                                           w2f={"left": np.arange(N_FS) % n + 1, "right": np.arange(N_FS) % n + 1})
    a, b = np.array([0.7, -1.3, 2.1]), 0.4
    pattern = ijk @ a + b
    smap = ns.build_surface_map(paths, ijk, SHAPE)
    got = smap.project(pattern)
    full = np.isclose(smap.coverage["left"], 1.0, atol=1e-6)
    assert full.sum() > 3000 and (~full).sum() > 100  # holes lower the coverage of some vertices
    native = np.arange(N5) % n
    expected = np.mean([(inner[layer][native] - 1.0) @ a + b for layer in ns.LAYERS], axis=0)
    np.testing.assert_allclose(got["left"][full], expected[full], atol=1e-4)


def test_first_voxel_last_voxel_just_outside_and_9999_rows(tmp_path, rng):
    X, Y, Z = SHAPE
    rows = {
        0: [1, 1, 1],  # -> voxel (0, 0, 0) exactly
        1: [X, Y, Z],  # -> the last voxel (valid)
        2: [X + 0.01, Y, Z],  # just outside: no value
        3: [9999, 9999, 9999],  # invalid marker
        4: [2, 9999, 3],  # one 9999 is enough
    }
    c = np.tile([[4.0, 4.0, 4.0]], (10, 1))
    for r, v in rows.items():
        c[r] = v
    coords = {layer: c for layer in ns.LAYERS}
    w2f = np.arange(N_FS) % 10 + 1
    paths, ijk, _, _ = _write_subject(tmp_path, rng, coords={"left": coords, "right": coords},
                                      w2f={"left": w2f, "right": w2f})
    smap = ns.build_surface_map(paths, ijk, SHAPE)
    pattern = rng.normal(size=len(ijk))
    first = int(np.flatnonzero((ijk == [0, 0, 0]).all(1))[0])
    last = int(np.flatnonzero((ijk == [X - 1, Y - 1, Z - 1]).all(1))[0])
    w = smap.weights["left"]
    assert w[0].nnz == 1 and w[0, first] == pytest.approx(1.0)
    assert w[1].nnz == 1 and w[1, last] == pytest.approx(1.0)
    got = smap.project(pattern)["left"]
    assert got[0] == pytest.approx(pattern[first], abs=1e-6) and got[1] == pytest.approx(pattern[last], abs=1e-6)
    for v in (2, 3, 4):
        assert smap.coverage["left"][v] == 0 and np.isnan(got[v])
    # coordinates outside the volume are reported, naming the file, the volume and an example
    assert any("lh.func1pt8-to-layerB1.mgz" in note and "outside the func1pt8mm volume (8, 9, 7)" in note
               for note in smap.notes), smap.notes


def test_permuting_white_to_fsaverage_permutes_the_output(tmp_path, rng):
    paths, ijk, coords, w2f = _write_subject(tmp_path / "a", rng)
    pattern = rng.normal(size=len(ijk))
    base = ns.build_surface_map(paths, ijk, SHAPE).project(pattern)
    perm = rng.permutation(N5)
    w2f_perm = {h: np.concatenate([w[:N5][perm], w[N5:]]) for h, w in w2f.items()}
    paths2, ijk2, _, _ = _write_subject(tmp_path / "b", np.random.default_rng(0), coords=coords, w2f=w2f_perm)
    assert np.array_equal(ijk2, ijk)
    permuted = ns.build_surface_map(paths2, ijk2, SHAPE).project(pattern)
    for h in HEMIS:
        np.testing.assert_array_equal(permuted[h], base[h][perm])


def test_the_files_are_nsd_format_mgh(tmp_path, rng):
    """Gzipped MGH, big-endian: version 1, dims (V, 1, 1, 3), type float32 (3), data as '>f4' after the 284-byte
    header; read back through nibabel with the same 1-based values and 9999 markers."""
    paths, ijk, coords, w2f = _write_subject(tmp_path, rng)
    raw = gzip.decompress(paths.layer_coords("lh", "layerB1").read_bytes())
    header = np.frombuffer(raw[:28], ">i4")
    n = len(coords["left"]["layerB1"])
    assert header[:6].tolist() == [1, n, 1, 1, 3, 3]  # version, dims, type (3 = float32)
    data = np.frombuffer(raw[284:284 + n * 3 * 4], ">f4").reshape(3, n).T  # MGH stores Fortran order
    np.testing.assert_array_equal(data, coords["left"]["layerB1"].astype(np.float32))
    assert (data == 9999).any()
    img = nib.load(paths.white_to_fsaverage("rh"))
    assert img.shape == (N_FS, 1, 1) and img.get_data_dtype() == np.dtype(">f4")
    np.testing.assert_array_equal(np.asarray(img.dataobj).ravel(), w2f["right"])


def test_the_map_is_cached_and_rebuilt_when_a_file_changes(tmp_path, rng):
    paths, ijk, coords, _ = _write_subject(tmp_path / "nsd", rng)
    cache = tmp_path / "cache"
    first = ns.load_surface_map(paths, ijk, SHAPE, cache_dir=cache)
    files = sorted(cache.glob("subj01-*.npz"))
    assert len(files) == 1
    again = ns.load_surface_map(paths, ijk, SHAPE, cache_dir=cache)
    for h in HEMIS:
        assert (again.weights[h] != first.weights[h]).nnz == 0
        np.testing.assert_array_equal(again.native_index[h], first.native_index[h])
    assert again.notes == first.notes
    # another voxel mask (one voxel fewer) -> another key
    ns.load_surface_map(paths, ijk[1:], SHAPE, cache_dir=cache)
    assert len(list(cache.glob("subj01-*.npz"))) == 2
    # a rewritten transform file (new content, new stamp) -> rebuilt from the new file
    shifted = coords["left"]["layerB2"].copy()
    shifted[shifted != 9999] = 9999
    write_layer_coords(paths.layer_coords("lh", "layerB2"), shifted)
    st = os.stat(paths.layer_coords("lh", "layerB2"))
    os.utime(paths.layer_coords("lh", "layerB2"), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    rebuilt = ns.load_surface_map(paths, ijk, SHAPE, cache_dir=cache)
    assert len(list(cache.glob("subj01-*.npz"))) == 3
    assert rebuilt.coverage["left"].max() <= 2 / 3 + 1e-6 < first.coverage["left"].max()  # one depth gone


def test_missing_transform_files_are_named_with_what_they_give(tmp_path, rng):
    paths, ijk, _, _ = _write_subject(tmp_path, rng)
    paths.white_to_fsaverage("rh").unlink()
    paths.layer_coords("lh", "layerB3").unlink()
    assert ns.missing_transform_files(paths) == [paths.layer_coords("lh", "layerB3"), paths.white_to_fsaverage("rh")]
    with pytest.raises(FileNotFoundError) as err:
        ns.load_surface_map(paths, ijk, SHAPE, cache_dir=tmp_path / "cache")
    text = str(err.value)
    assert "lh.func1pt8-to-layerB3.mgz" in text and "rh.white-to-fsaverage.mgz" in text
    assert "three cortical depths" in text and "fsaverage5 surface" in text


def test_bad_index_and_coordinate_files(tmp_path, rng):
    paths, ijk, coords, w2f = _write_subject(tmp_path, rng)
    write_mgh(paths.white_to_fsaverage("lh"), w2f["left"][:-1].reshape(-1, 1, 1))  # one row short
    with pytest.raises(NSDFormatError, match=r"lh\.white-to-fsaverage\.mgz: must have one row per fsaverage vertex "
                                             r"\(163,842\); it has 163,841"):
        ns.build_surface_map(paths, ijk, SHAPE)
    too_big = w2f["left"].copy()
    too_big[5] = 301  # the left hemisphere has 300 native vertices
    write_white_to_fsaverage(paths.white_to_fsaverage("lh"), too_big)
    with pytest.raises(NSDFormatError, match=r"1-based native vertices in 1\.\.300 .* found 1\.\.301"):
        ns.build_surface_map(paths, ijk, SHAPE)
    write_white_to_fsaverage(paths.white_to_fsaverage("lh"), w2f["left"])
    write_layer_coords(paths.layer_coords("lh", "layerB2"), coords["left"]["layerB2"][:-1])
    with pytest.raises(NSDFormatError, match="the same rows"):
        ns.build_surface_map(paths, ijk, SHAPE)
    write_mgh(paths.layer_coords("lh", "layerB2"), coords["left"]["layerB2"][:, :2].reshape(-1, 1, 1, 2))
    with pytest.raises(NSDFormatError, match=r"shape \(n_vertices, 1, 1, 3\)"):
        ns.build_surface_map(paths, ijk, SHAPE)


def test_hemispheres_from_the_hemisphere_nsdgeneral_files(tmp_path, rng):
    paths, ijk, _, _ = _write_subject(tmp_path, rng)
    affine = np.diag([1.8, 1.8, 1.8, 1.0])
    truth = np.where(rng.random(len(ijk)) < 0.5, "left", "right")
    for hemi, h in HEMIS.items():
        vol = np.full(SHAPE, -1, np.int16)
        vol[tuple(ijk[truth == hemi].T)] = 1
        vol[tuple(ijk[(truth == hemi)][:3].T)] = 0  # cortex but unlabelled: still this hemisphere
        write_label_volume(paths.hemi_nsdgeneral(h), vol, affine)
    np.testing.assert_array_equal(ns.hemispheres_from_nsdgeneral(paths, ijk), truth)
    both = np.asarray(nib.load(paths.hemi_nsdgeneral("rh")).dataobj).copy()
    k = int(np.flatnonzero(truth == "left")[0])
    both[tuple(ijk[k])] = 1  # a left voxel claimed by the right hemisphere too
    write_label_volume(paths.hemi_nsdgeneral("rh"), both, affine)
    with pytest.raises(NSDFormatError, match=rf"1 nsdgeneral voxels are in both or neither .* voxel "
                                             rf"\({ijk[k][0]}, {ijk[k][1]}, {ijk[k][2]}\)"):
        ns.hemispheres_from_nsdgeneral(paths, ijk)
    paths.hemi_nsdgeneral("lh").unlink()
    with pytest.raises(FileNotFoundError, match="lh.nsdgeneral.nii.gz is missing"):
        ns.hemispheres_from_nsdgeneral(paths, ijk)


def test_roi_outlines_from_surface_labels_else_from_voxels(tmp_path, rng):
    paths, ijk, coords, w2f = _write_subject(tmp_path, rng)
    smap = ns.build_surface_map(paths, ijk, SHAPE)
    voxel_v1 = rng.random(len(ijk)) < 0.4

    def voxel_mask(name):
        assert name in ("V1", "faces")
        return voxel_v1

    labels = {}
    for (hemi, h), n in zip(HEMIS.items(), (300, 260)):
        labels[hemi] = rng.integers(0, 8, n)  # prf-visualrois: V1 = labels 1 and 2
        write_surface_label(paths.surface_label(h, "prf-visualrois"), labels[hemi], {1: "V1v", 2: "V1d"})
    out, notes = ns.roi_outlines(paths, smap, ["V1", "faces"], voxel_mask)
    assert notes == []
    assert paths.surface_label("lh", "prf-visualrois").with_name("lh.prf-visualrois.mgz.ctab").read_text() \
        == "0 Unknown\n1 V1v\n2 V1d\n"
    for hemi in HEMIS:
        native = w2f[hemi][:N5] - 1
        np.testing.assert_array_equal(out["V1"][hemi], np.isin(labels[hemi][native], [1, 2]))  # from the labels
        values = smap.project(voxel_v1.astype(float))[hemi]  # faces: no label file -> voxel mask through the map
        np.testing.assert_array_equal(out["faces"][hemi], np.nan_to_num(values) > 0.5)
    # a label file of the wrong length: a note naming it, and the voxel outline instead
    write_surface_label(paths.surface_label("rh", "prf-visualrois"), labels["right"][:-4], {1: "V1v"})
    out, notes = ns.roi_outlines(paths, smap, ["V1"], voxel_mask)
    assert len(notes) == 1 and "rh.prf-visualrois.mgz" in notes[0] and "(260, the rows" in notes[0]
    assert "it has 256" in notes[0] and "drawn from its voxels" in notes[0]
    np.testing.assert_array_equal(out["V1"]["left"], smap.voxel_roi_on_surface(voxel_v1)["left"])


def _gifti_bytes(values) -> bytes:
    img = nib.GiftiImage(darrays=[nib.gifti.GiftiDataArray(np.asarray(values, np.float32))])
    return img.to_bytes()


def _mgz_bytes(values) -> bytes:
    return gzip.compress(nib.MGHImage(np.asarray(values, np.float32).reshape(-1, 1, 1), np.eye(4)).to_bytes())


def test_surface_uploads_on_fsaverage_and_fsaverage5(rng):
    fsavg = rng.normal(size=N_FS).astype(np.float32)
    fs5 = rng.normal(size=N5).astype(np.float32)
    maps = ns.surface_patterns_from_uploads([("lh.pattern.func.gii", _gifti_bytes(fsavg)),
                                             ("sub-01_hemi-R_pattern.mgz", _mgz_bytes(fs5))])
    np.testing.assert_array_equal(maps["left"], fsavg[:N5])  # fsaverage5 = the first 10,242 fsaverage vertices
    np.testing.assert_array_equal(maps["right"], fs5)
    raw_mgh = nib.MGHImage(fs5.reshape(-1, 1, 1), np.eye(4)).to_bytes()  # .mgh (not gzipped)
    np.testing.assert_array_equal(ns.read_surface_pattern("x.mgh", raw_mgh), fs5)


def test_surface_uploads_on_the_wrong_mesh_or_badly_named_are_refused(rng):
    with pytest.raises(ValueError, match=r"lh\.native\.mgz: has 227,000 vertices \(not an fsaverage mesh.*"
                                         r"fsaverage \(163,842 vertices a hemisphere\) or fsaverage5 \(10,242\)"):
        ns.read_surface_pattern("lh.native.mgz", _mgz_bytes(np.zeros(227000)))
    with pytest.raises(ValueError, match=r"2,562 vertices \(fsaverage4\)"):
        ns.read_surface_pattern("lh.x.gii", _gifti_bytes(np.zeros(2562)))
    with pytest.raises(ValueError, match="could not be read as GIfTI"):
        ns.read_surface_pattern("lh.x.gii", b"not xml at all")
    with pytest.raises(ValueError, match="must say its hemisphere"):
        ns.surface_patterns_from_uploads([("pattern.gii", _gifti_bytes(np.zeros(N5)))])
    with pytest.raises(ValueError, match="a second file for the left hemisphere"):
        ns.surface_patterns_from_uploads([("lh.a.gii", _gifti_bytes(np.zeros(N5))),
                                          ("lh.b.gii", _gifti_bytes(np.zeros(N5)))])
    with pytest.raises(ValueError, match="GIfTI .* or FreeSurfer MGH"):
        ns.read_surface_pattern("lh.x.npy", io.BytesIO(b"x").getvalue())
