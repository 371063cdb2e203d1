"""brain_diffuser_core.neighbours (nearest CLIP features) and the Walkthrough's nearest captions / images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from brain_diffuser_core import neighbours


def _loop_cosines(query, bank, centre):
    """Independent reference: plain Python loops over bank entries."""
    n = bank.shape[0]
    flat = [bank[i].ravel().astype(np.float64) for i in range(n)]
    q = np.asarray(query, dtype=np.float64).ravel()
    if centre:
        mean = sum(flat) / n
        flat = [f - mean for f in flat]
        q = q - mean
    out = []
    for f in flat:
        dot = sum(float(a) * float(b) for a, b in zip(q, f))
        nq = sum(float(a) * float(a) for a in q) ** 0.5
        nf = sum(float(b) * float(b) for b in f) ** 0.5
        out.append(dot / (nq * nf))
    return out


@pytest.mark.parametrize("centre", [True, False])
def test_nearest_and_rank_match_a_loop(centre):
    rng = np.random.default_rng(3)
    bank = rng.normal(size=(9, 4, 3)).astype(np.float32) + 0.5
    query = rng.normal(size=(4, 3)).astype(np.float32)
    ref = _loop_cosines(query, bank, centre)
    order = sorted(range(9), key=lambda i: -ref[i])
    idx, cos = neighbours.nearest(query, bank, k=5, centre=centre)
    assert idx.dtype == np.int64 and cos.dtype == np.float32 and idx.shape == cos.shape == (5,)
    assert list(idx) == order[:5]
    np.testing.assert_allclose(cos, [ref[i] for i in order[:5]], rtol=1e-5, atol=1e-6)
    # flattened query gives the same answer; k larger than N is clipped
    idx2, _ = neighbours.nearest(query.ravel(), bank, k=50, centre=centre)
    assert list(idx2) == order
    for true in range(9):
        assert neighbours.rank_of(query, bank, true, centre=centre) == order.index(true) + 1


def test_centring_changes_the_answer():
    """A large shared component (like CLIP's start token) makes the raw cosine pick the entry with the most of
    it; after removing the bank's mean, the entry sharing the query's distinctive direction wins."""
    # entry 0 shares the query's distinctive +y direction; entry 1 is the pure common component
    bank = np.array([[10.0, 1.0, 0.0], [10.0, 0.0, 0.1], [10.0, -1.0, 0.0]], dtype=np.float32)[:, None, :]
    query = np.array([[10.0, 0.3, 0.0]], dtype=np.float32)  # (1, 3)
    raw, _ = neighbours.nearest(query, bank, k=1, centre=False)
    cen, _ = neighbours.nearest(query, bank, k=1, centre=True)
    assert raw[0] == 1 and cen[0] == 0
    assert neighbours.rank_of(query, bank, 0, centre=True) == 1
    assert neighbours.rank_of(query, bank, 0, centre=False) > 1


def test_shape_and_value_errors_name_the_input():
    bank = np.zeros((4, 3, 2), dtype=np.float32)
    with pytest.raises(ValueError, match=r"'query' must have shape \(3, 2\) or \(6,\).*found shape \(2, 3\)"):
        neighbours.nearest(np.zeros((2, 3)), bank)
    with pytest.raises(ValueError, match=r"'bank' must have shape \(N >= 1, T, D\); found shape \(4, 6\)"):
        neighbours.nearest(np.zeros(6), bank.reshape(4, 6))
    with pytest.raises(ValueError, match="'k' must be >= 1; 0"):
        neighbours.nearest(np.zeros(6), bank, k=0)
    with pytest.raises(ValueError, match=r"'true_index' must be in \[0, 4\); 4"):
        neighbours.rank_of(np.ones(6), bank + np.arange(4)[:, None, None], 4)
    q = np.ones(6)
    q[2] = np.nan
    with pytest.raises(ValueError, match="finite"):
        neighbours.nearest(q, bank)


class _FakeExtractor:
    """Records calls; returns features that encode the inputs so the wrappers' pass-through can be checked."""

    def text_embeddings_batch(self, caption_lists):
        return np.stack([np.full((77, 2), len(c), dtype=np.float64) for c in caption_lists])

    def vision_embeddings(self, images):
        return np.stack([np.full((257, 2), img.mean()) for img in images])


def test_bank_wrappers_pass_through_and_cast():
    ex = _FakeExtractor()
    text = neighbours.caption_bank(ex, [("a", "b"), ["c"]])
    assert text.shape == (2, 77, 2) and text.dtype == np.float32
    assert text[0, 0, 0] == 2 and text[1, 0, 0] == 1
    imgs = np.stack([np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 4, np.uint8)])
    vis = neighbours.image_bank(ex, imgs)
    assert vis.shape == (2, 257, 2) and vis.dtype == np.float32 and vis[1, 0, 0] == 4


# ------------------------------------------------------------------------------------------------ app
def test_walkthrough_shows_nearest_captions_and_images(app, sources):
    bundle, world, cache = sources
    at = app
    at.run()
    at.switch_page("pages/walkthrough.py").run()
    at.number_input(key="walk_index").set_value(2).run()
    at.button(key="walk_run").click().run()
    errors = [e.value for e in at.error] + [str(e.value) for e in at.exception]
    assert not errors, errors
    assert not [i.value for i in at.info if "not available" in i.value], [i.value for i in at.info]
    subs = [s.value for s in at.subheader]
    assert "Nearest test captions to the predicted CLIP-text features" in subs
    assert "Nearest test images to the predicted CLIP-vision features" in subs
    # the listed captions are the top 5 by the library's ranking of the bank the page used
    from brain_diffuser_core.nsd import load_subject

    subj = load_subject(world, 1, cache_dir=cache, progress=False)
    (rec, _), = at.session_state["walk_results"].values()
    ids = [int(i) for i in subj.test_image_ids]
    captions = [subj.captions(i) for i in ids]
    lists = [m.value for m in at.markdown if m.value.startswith("1. `")]
    assert len(lists) == 1
    lines = lists[0].splitlines()
    assert len(lines) == 5
    shown = [line.split("` ", 1)[1].replace(" **<- true image**", "") for line in lines]
    assert all(any(s == c[0] for c in captions) for s in shown), shown
    cos = [float(line.split("`")[1]) for line in lines]
    assert cos == sorted(cos, reverse=True) and all(-1 <= c <= 1 for c in cos)
    ranks = [c.value for c in at.caption if "rank" in c.value and " of " in c.value]
    assert any(r.startswith("The true image's captions rank ") and r.endswith(f" of {len(ids)}.") for r in ranks), ranks
    assert any(r.startswith("The true image ranks ") for r in ranks), ranks
    true_caption = captions[2][0]
    marked = [line for line in lines if "<- true image" in line]
    rank_text = next(r for r in ranks if r.startswith("The true image's captions rank "))
    rank = int(rank_text.split("rank ")[1].split(" of")[0])
    assert (rank <= 5) == bool(marked)
    if marked:
        assert true_caption in marked[0]
    # the page's order is the library's on a bank built here independently from the bundle's CLIP
    from brain_diffuser_core.bundle import load_bundle
    from brain_diffuser_core.features.clip import ClipFeatureExtractor

    ex = ClipFeatureExtractor.from_pretrained(load_bundle(bundle).models["versatile_diffusion"]["path"])
    idx, _ = neighbours.nearest(rec.features["clip_text"], ex.text_embeddings_batch(captions), k=5)
    assert shown == [captions[i][0] for i in idx]
    vbank = ex.vision_embeddings(np.stack([subj.image(i) for i in ids]))
    vidx, vcos = neighbours.nearest(rec.features["clip_vision"], vbank, k=5)
    thumbs = [c for img in at.image for c in img.captions if c[:1] in "+-" and c[1:2].isdigit()]
    assert len(thumbs) == 5
    np.testing.assert_allclose([float(c.split()[0]) for c in thumbs], vcos, atol=1e-3)
    assert [i for i, c in enumerate(thumbs) if c.endswith("(true)")] == [int(j) for j in np.flatnonzero(vidx == 2)]
    vrank = neighbours.rank_of(rec.features["clip_vision"], vbank, 2)
    assert f"The true image ranks {vrank} of {len(ids)}." in ranks
