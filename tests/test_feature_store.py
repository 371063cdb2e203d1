import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from brain_diffuser_core.features.store import FeatureStore, FeatureWriter, read_safetensors_memmap, write_features


def test_three_layouts_read_back_in_requested_order(rng, tmp_path):
    ids = np.array([5, 900, 17, 42000, 3], dtype=np.int64)
    a = rng.standard_normal((5, 6)).astype(np.float32)
    b = rng.standard_normal((5, 3, 4)).astype(np.float32)
    c = rng.standard_normal((5, 2)).astype(np.float32)
    write_features(tmp_path, "vdvae", ids, a, dtype="float32")
    write_features(tmp_path, "clip_text", ids, b, dtype="float16", layout="npy")
    w = FeatureWriter(tmp_path, "clip_vision", (2,), dtype="float32")
    w.append(ids[:2], c[:2])
    w.append(ids[2:], c[2:])
    store = FeatureStore(tmp_path)
    assert store.names() == ["clip_text", "clip_vision", "vdvae"]
    assert store.shape("clip_text") == (3, 4) and store.shape("vdvae") == (6,)
    np.testing.assert_array_equal(store.ids("clip_vision"), np.sort(ids))
    ask = np.array([3, 42000, 5, 3])
    order = [4, 3, 0, 4]
    got = store.get("vdvae", ask)
    assert got.dtype == np.float32 and got.shape == (4, 6)
    np.testing.assert_array_equal(got, a[order])
    np.testing.assert_array_equal(store.get("clip_text", ask), b[order].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(store.get("clip_vision", ask), c[order])


def test_our_safetensors_files_are_standard(rng, tmp_path):
    ids = np.arange(4) * 7
    x = rng.standard_normal((4, 3)).astype(np.float32)
    path = write_features(tmp_path, "vdvae", ids, x, dtype="float16")
    t = load_file(str(path))  # the official reader accepts what we wrote
    np.testing.assert_array_equal(t["image_ids"].numpy(), ids)
    np.testing.assert_array_equal(t["features"].numpy(), x.astype(np.float16))
    # and we read what the official writer wrote (memory-mapped)
    save_file({"image_ids": torch.tensor([9, 1]), "features": torch.ones(2, 5, dtype=torch.float16) * 2},
              str(tmp_path / "clip_text.safetensors"))
    mm = read_safetensors_memmap(tmp_path / "clip_text.safetensors")
    assert isinstance(mm["features"], np.memmap)
    np.testing.assert_array_equal(FeatureStore(tmp_path).get("clip_text", [1]), np.full((1, 5), 2.0, np.float32))


def test_writer_resumes_and_refuses_duplicates_and_mismatch(rng, tmp_path):
    w = FeatureWriter(tmp_path, "clip_text", (3,))
    assert w.done_ids().tolist() == []
    w.append([10, 11], rng.standard_normal((2, 3)))
    w2 = FeatureWriter(tmp_path, "clip_text", (3,))  # reopened, e.g. after an interruption
    assert w2.done_ids().tolist() == [10, 11]
    w2.append([12], rng.standard_normal((1, 3)))
    assert sorted(p.name for p in (tmp_path / "clip_text").iterdir()) == [
        "meta.json", "shard-00000.safetensors", "shard-00001.safetensors"]
    assert not list(tmp_path.glob("**/.*tmp*"))
    with pytest.raises(ValueError, match=r"already written.*\[11\]"):
        w2.append([11, 13], rng.standard_normal((2, 3)))
    with pytest.raises(ValueError, match=r"rows must have shape \(3,\); \(4,\)"):
        w2.append([13], rng.standard_normal((1, 4)))
    with pytest.raises(ValueError, match="holds shape"):
        FeatureWriter(tmp_path, "clip_text", (4,))
    assert FeatureStore(tmp_path).ids("clip_text").tolist() == [10, 11, 12]


def test_clear_errors(rng, tmp_path):
    write_features(tmp_path, "vdvae", [1, 2, 3], rng.standard_normal((3, 2)))
    store = FeatureStore(tmp_path)
    with pytest.raises(KeyError, match=r"lacks 2 requested image ids: \[7, 9\]"):
        store.get("vdvae", [1, 9, 7])
    with pytest.raises(KeyError, match=r"'clip_text' is not in the store.*\['vdvae'\]"):
        store.get("clip_text", [1])
    with pytest.raises(ValueError, match="duplicates"):
        write_features(tmp_path, "x", [1, 1], np.zeros((2, 2)))
    with pytest.raises(ValueError, match="'name' must be"):
        write_features(tmp_path, "../evil", [1], np.zeros((1, 2)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FeatureStore(tmp_path / "nope")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad json}......")
    with pytest.raises(ValueError, match="not a safetensors file"):
        FeatureStore(tmp_path).get("broken", [1])


def test_package_import_is_light():
    code = "import sys, brain_diffuser_core.features; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_column_slices_of_flattened_features(rng, tmp_path):
    ids = np.array([4, 2, 8])
    x = rng.standard_normal((3, 5, 4)).astype(np.float32)
    write_features(tmp_path, "clip_text", ids, x, dtype="float32")
    w = FeatureWriter(tmp_path, "clip_vision", (5, 4), dtype="float32")
    w.append(ids[:1], x[:1])
    w.append(ids[1:], x[1:])
    store = FeatureStore(tmp_path)
    for name in ("clip_text", "clip_vision"):
        got = store.get(name, [8, 4], columns=slice(6, 13))
        np.testing.assert_array_equal(got, x[[2, 0]].reshape(2, -1)[:, 6:13])
    with pytest.raises(ValueError, match="step 1"):
        store.get("clip_text", [8], columns=slice(0, 10, 2))
