"""`download nsd|weights|verify` against loopback servers only: moto S3 holding an NSD-format tree (written with
the project's writers; uniform and non-uniform multipart objects; one key denied), a fault-injecting proxy, a
Range-capable HTTP server for the VDVAE file and COCO captions, and a fake hub (tree + resolve routes).
A guard fails any test that opens a socket to anything but 127.0.0.1."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import download_servers as ds  # sets S3_UPLOAD_PART_MIN_SIZE before moto is imported
from brain_diffuser_core.__main__ import main
from brain_diffuser_core.download import errors as E
from brain_diffuser_core.download import plan as P
from brain_diffuser_core.download import transfer as T
from brain_diffuser_core.download.manifest import MANIFEST_NAME, Manifest, verify
from brain_diffuser_core.download.run import (VD_REPO, VD_REVISION, VDVAE_NAME, NSDOptions, WeightsOptions,
                                              download_nsd, download_weights)
from brain_diffuser_core.download.s3 import S3Source
from brain_diffuser_core.download.stimuli import fetch_subset
from brain_diffuser_core.download.errors import DownloadError
from brain_diffuser_core.io import sha256_file
from brain_diffuser_core.nsd import load_subject
from brain_diffuser_core.nsd_format import NSDPaths, write_betas_hdf5, write_betas_nifti, write_stimuli_hdf5
from nsd_fixtures import expected_arrays, make_nsd_tree

FAST = dict(backoff_s=0.001, backoff_max_s=0.01, checkpoint_bytes=64 << 10)
S1 = "nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_session01.nii.gz"  # uniform parts
S2 = "nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_session02.nii.gz"  # non-uniform
S3_H5 = "nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_session03.hdf5"  # denied
ROI = "nsddata/ppdata/subj01/func1pt8mm/roi/prf-visualrois.nii.gz"  # single part
VD_FILES = {
    "model_index.json": b'{"_class_name": "VersatileDiffusionPipeline"}',
    "image_unet/config.json": b'{"sample_size": 8}',
    "image_unet/diffusion_pytorch_model.bin": os.urandom(150_000),
    "text_unet/config.json": b'{"sample_size": 8}',
    "text_unet/diffusion_pytorch_model.bin": os.urandom(90_000),
    "vae/config.json": b"{}",
    "vae/diffusion_pytorch_model.bin": os.urandom(40_000),
    "scheduler/scheduler_config.json": b'{"beta_start": 0.00085}',
    "tokenizer/vocab.json": b'{"a": 0}',
    "pretrained_pth/vd-four-flow-v1-0.pth": os.urandom(70_000),  # never fetched
    "README.md": b"# Versatile Diffusion",
}
VDVAE_BYTES = os.urandom(200_000)


# ------------------------------------------------------------------------------------------------ the guard
_REAL_CONNECT = socket.socket.connect
_REAL_CONNECT_EX = socket.socket.connect_ex


def _loopback_only(address) -> None:
    if isinstance(address, tuple) and address and address[0] not in ("127.0.0.1",):
        raise AssertionError(f"test opened a socket to {address!r}: only 127.0.0.1 is allowed")


@pytest.fixture(autouse=True)
def loopback_guard(monkeypatch):
    def connect(self, address):
        _loopback_only(address)
        return _REAL_CONNECT(self, address)

    def connect_ex(self, address):
        _loopback_only(address)
        return _REAL_CONNECT_EX(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.delenv("BRAIN_DIFFUSER_ACCEPT_NSD_TERMS", raising=False)


def test_guard_refuses_other_addresses():
    with pytest.raises(AssertionError, match="only 127.0.0.1"):
        socket.create_connection(("10.255.255.1", 9), timeout=0.1)


# ------------------------------------------------------------------------------------------------ servers
@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    src = tmp_path_factory.mktemp("remote")
    fx = make_nsd_tree(src, subject=1, n_sessions=2, n_stimuli_images=6)
    write_betas_hdf5(src / S3_H5, fx.betas[1])  # stands in for session 3's .hdf5, which the bucket denies
    rng = np.random.default_rng(1)
    subj = NSDPaths(src, 1)
    for name in P.TRANSFORM_NAMES[:2]:  # opaque surface files: the downloader does not read them
        p = src / f"nsddata/ppdata/subj01/transforms/{name}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.bytes(3000))
    for hemi in ("lh", "rh"):
        subj.surface_label(hemi, "prf-visualrois").parent.mkdir(parents=True, exist_ok=True)
        subj.surface_label(hemi, "prf-visualrois").write_bytes(rng.bytes(1500))
    other = tmp_path_factory.mktemp("subj02") / "betas_session01.nii.gz"  # another subject's session 1
    write_betas_nifti(other, rng.integers(-3000, 3000, (5, 6, 4, 750)).astype(np.int16), fx.affine)

    moto, moto_url = ds.start_moto()
    admin = ds.admin_client(moto_url)
    ds.create_public_bucket(admin, denied_keys=[S3_H5])
    layout = {}
    for path in sorted(p for p in src.rglob("*") if p.is_file() and "annotations" not in p.parts):
        key = str(path.relative_to(src))
        data = path.read_bytes()
        parts = None
        if key == S1:
            parts = ds.uniform_parts(len(data), 16 << 10)
        elif key == S2:
            parts = [20_000, 35_000, 10_000]  # rest > 20,000: not explained by uniform parts
        elif key == P.EXPDESIGN_KEY:
            p = int(len(data) / 2.4)
            parts = [p, p // 2]  # looks uniform from part 1, is not: found when the ETag fails
        elif key == P.STIMULI_KEY:
            parts = ds.uniform_parts(len(data), 1 << 20)
        ds.upload(admin, key, data, parts)
        layout[key] = data
    site = ds.StaticSite()
    site.files["/coco/annotations_trainval2017.zip"] = ds.coco_zip(subj.annotations_dir)
    site.files["/vdvae/" + VDVAE_NAME] = VDVAE_BYTES
    site.content_md5.add("/vdvae/" + VDVAE_NAME)
    for path, data in VD_FILES.items():
        site.files[f"/{VD_REPO}/resolve/{VD_REVISION}/{path}"] = data
    site.json_routes[f"/api/models/{VD_REPO}/tree/{VD_REVISION}"] = ds.hub_tree(VD_FILES)
    static = ds.start_static(site)
    proxy, proxy_server = ds.start_proxy(moto_url)
    hproxy, hproxy_server = ds.start_proxy(site.url)
    yield dict(fx=fx, other=other, admin=admin, moto_url=moto_url, proxy=proxy, hproxy=hproxy, site=site,
               layout=layout)
    for s in (proxy_server, hproxy_server, static):
        s.shutdown()
    moto.stop()


@pytest.fixture
def proxies(servers):
    servers["proxy"].reset()
    servers["hproxy"].reset()
    yield servers["proxy"], servers["hproxy"]
    servers["proxy"].reset()
    servers["hproxy"].reset()


def nsd_opts(servers, out, **kw) -> NSDOptions:
    base = dict(subject=1, out=Path(out), sessions=[1, 2], s3_endpoint=servers["proxy"].url,
                coco_url=servers["hproxy"].url + "/coco/annotations_trainval2017.zip", accept_terms=True,
                progress=False, jobs=4, policy=T.Policy(**FAST))
    base.update(kw)
    return NSDOptions(**base)


def object_gets(proxy) -> list[dict]:
    """Data requests: GETs of objects (bucket listings excluded)."""
    return [e for e in proxy.requests(method="GET") if "list-type" not in e["path"]]


@pytest.fixture(scope="module")
def complete_root(servers, tmp_path_factory):
    """A ROOT filled by one clean run (sessions 1-2, subset stimuli, COCO captions) and that run's report."""
    servers["proxy"].reset()
    out = tmp_path_factory.mktemp("complete") / "nsd"
    report = download_nsd(nsd_opts(servers, out))
    sent = servers["proxy"].sent()
    return out, report, sent


# ------------------------------------------------------------------------------------------------ runs
def test_dry_run_makes_no_data_request(servers, proxies, tmp_path, capsys):
    proxy, hproxy = proxies
    out = tmp_path / "nsd"
    report = download_nsd(nsd_opts(servers, out, dry_run=True, accept_terms=False))
    assert object_gets(proxy) == [] and hproxy.requests(method="GET") == []
    assert not out.exists()
    text = capsys.readouterr().err
    for key in (P.EXPDESIGN_KEY, S1, S2, ROI, P.STIMULI_KEY, P.COCO_ZIP_REL):
        assert key in text
    assert "total" in text and "free at" in text and "dry run: nothing was downloaded" in text
    sizes = {it.rel: it.size for it in report.plan.items}
    assert sizes[S1] == len(servers["layout"][S1])


def test_full_run_then_load_subject_rerun_and_verify(servers, complete_root, proxies, tmp_path):
    out, report, sent = complete_root
    fx = servers["fx"]
    files = [it for it in report.plan.items if it.kind == "file" and it.source == "s3"]
    file_bytes = sum(it.size for it in files)
    subset = report.subset
    # a clean run receives each file once: bytes fetched = file bytes + the subset's pixels and HDF5 metadata
    assert sent == file_bytes + subset.data_bytes + subset.metadata_bytes
    for key, data in servers["layout"].items():
        if key in (P.STIMULI_KEY, S3_H5) or key.endswith(".hdf5") or "subj01" not in key and "experiments" not in key:
            continue
        assert sha256_file(out / key) == hashlib.sha256(data).hexdigest(), key
    subject = load_subject(out, 1, sessions=[1, 2], cache_dir=tmp_path / "cache", progress=False)
    exp = expected_arrays(fx)
    np.testing.assert_array_equal(subject.train_image_ids, exp["train_image_ids"])
    np.testing.assert_allclose(subject.train_fmri, exp["train_fmri"], rtol=1e-4, atol=1e-4)
    some = next(i for i, caps in fx.captions.items() if any(caps))
    assert subject.captions(some) == [c for c in fx.captions[some] if c]
    assert verify(out).ok
    # a re-run over the complete folder: listings and HEADs only, nothing transferred
    proxy, hproxy = proxies
    again = download_nsd(nsd_opts(servers, out))
    assert object_gets(proxy) == [] and hproxy.requests(method="GET") == []
    assert again.files_fetched == 0 and again.fetched_bytes == 0
    assert again.files_present == len(report.plan.items)


def test_subset_pixels_and_reader_refuses_absent_ids(servers, complete_root):
    out, report, _ = complete_root
    fx = servers["fx"]
    subject = load_subject(out, 1, sessions=[1, 2], progress=False, cache_dir=out.parent / "c2")
    for image_id, pixels in fx.images.items():
        np.testing.assert_array_equal(subject.image(image_id), pixels)
    shown = set(fx.trial_image_ids().tolist())
    # the 6 images the remote file holds are the only pixel bytes fetched; the other shown ids read as zeros
    assert report.subset.data_bytes == len(fx.images) * 425 * 425 * 3
    assert report.subset.n_images == len(shown)
    absent = next(i for i in range(73000) if i not in shown)
    with pytest.raises(FileNotFoundError, match="download nsd --subject 1"):
        subject.image(absent)


def test_full_stimuli_file(servers, proxies, tmp_path):
    out = tmp_path / "nsd"
    download_nsd(nsd_opts(servers, out, sessions=[1], stimuli="full", captions="none"))
    assert (out / P.STIMULI_KEY).read_bytes() == servers["layout"][P.STIMULI_KEY]
    subject = load_subject(out, 1, sessions=[1], progress=False, cache_dir=tmp_path / "cache")
    image_id, pixels = next(iter(servers["fx"].images.items()))
    np.testing.assert_array_equal(subject.image(image_id), pixels)


def _subset_remote(servers, key: str, contiguous: bool, n: int = 2000, size: int = 32, held: int = 300):
    rng = np.random.default_rng(3)
    images = {int(i): rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
              for i in rng.choice(n, held, replace=False)}
    import h5py

    path = Path(servers["fx"].root).parent / f"{key.replace('/', '_')}"
    if contiguous:
        with h5py.File(path, "w") as f:
            d = f.create_dataset("imgBrick", shape=(n, size, size, 3), dtype=np.uint8)
            for i, img in images.items():
                d[i] = img
    else:
        write_stimuli_hdf5(path, images, n_stimuli=n, image_size=size)
    data = path.read_bytes()
    ds.upload(servers["admin"], key, data)
    return images, len(data)


@pytest.mark.parametrize("contiguous", [True, False])
def test_subset_fetches_only_the_images_asked(servers, proxies, tmp_path, contiguous):
    key = f"test/stimuli-{'contiguous' if contiguous else 'chunked'}.hdf5"
    images, file_size = _subset_remote(servers, key, contiguous)
    s3 = S3Source(endpoint_url=servers["proxy"].url)
    remote = s3.remote(s3.head(key))
    ids = sorted(images)[:20]
    dest = tmp_path / "nsd_stimuli.hdf5"
    result = fetch_subset(s3, remote, dest, ids, policy=T.Policy(**FAST), jobs=2)
    import h5py

    with h5py.File(dest, "r") as f:
        present = f["present"][:]
        assert present.sum() == len(ids) and present[ids].all()
        for i in ids:
            np.testing.assert_array_equal(f["imgBrick"][i], images[i])
    image_bytes = 32 * 32 * 3
    assert result.data_bytes == len(ids) * image_bytes
    assert proxies[0].sent(key) == result.data_bytes + result.metadata_bytes
    assert result.metadata_bytes <= 4 * (64 << 10) < file_size


def test_two_drops_resume_from_part_boundaries(servers, proxies, tmp_path):
    proxy, _ = proxies
    size = len(servers["layout"][S1])
    proxy.add("drop", S1, n=40_000, times=2)  # 2 parts of 16 KiB and a bit, twice
    out = tmp_path / "nsd"
    report = download_nsd(nsd_opts(servers, out, sessions=[1], stimuli="none", captions="none"))
    gets = [e for e in object_gets(proxy) if S1 in e["path"]]
    starts = [int(e["range"].split("=")[1].split("-")[0]) for e in gets]
    assert starts == [0, 2 * (16 << 10), 4 * (16 << 10)]
    fetched = proxy.sent(S1)
    assert size < fetched < 1.5 * size
    assert report.per_file[S1]["retries"] == 2
    assert sha256_file(out / S1) == hashlib.sha256(servers["layout"][S1]).hexdigest()
    assert not T.part_paths(out / S1)[0].exists()


def test_killed_process_resumes_on_next_run(servers, proxies, tmp_path):
    proxy, _ = proxies
    proxy.add("hang", S2, n=70_000)  # non-uniform parts 20,000 / 35,000 / 10,000 / rest: stalls in part 3
    out = tmp_path / "nsd"
    cmd = [sys.executable, "-m", "brain_diffuser_core", "download", "nsd", "--subject", "1", "--sessions", "2",
           "--out", str(out), "--s3-endpoint", proxy.url, "--stimuli", "none", "--captions", "none",
           "--accept-nsd-terms", "--no-progress", "--jobs", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=Path(__file__).resolve().parents[1])
    state = T.part_paths(out / S2)[1]
    deadline = time.time() + 40
    try:
        while time.time() < deadline:
            if state.exists() and len(json.loads(state.read_text() or "{}").get("block_md5", [])) >= 2:
                break
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    recorded = len(json.loads(state.read_text())["block_md5"])
    assert recorded >= 2 and not (out / S2).exists()
    proxy.reset()
    download_nsd(nsd_opts(servers, out, sessions=[2], stimuli="none", captions="none"))
    first = [e for e in object_gets(proxy) if S2 in e["path"]][0]
    part_ends = [20_000, 55_000, 65_000]
    assert first["range"].startswith(f"bytes={part_ends[recorded - 1]}-")  # the last recorded part boundary
    assert sha256_file(out / S2) == hashlib.sha256(servers["layout"][S2]).hexdigest()


def test_flipped_byte_is_caught_and_fetched_again(servers, proxies, tmp_path):
    proxy, _ = proxies
    proxy.add("flip", ROI, n=100)
    proxy.add("flip", S1, n=70_000)  # multipart: caught by the multipart ETag
    out = tmp_path / "nsd"
    report = download_nsd(nsd_opts(servers, out, sessions=[1], stimuli="none", captions="none"))
    for key in (ROI, S1):
        assert sha256_file(out / key) == hashlib.sha256(servers["layout"][key]).hexdigest()
        assert report.per_file[key]["restarts"] == 1
        assert proxy.sent(key) == 2 * len(servers["layout"][key])


def test_non_uniform_parts_hidden_behind_a_uniform_looking_part_one(servers, proxies, tmp_path):
    # the design file's parts are p, p/2, rest: part 1 suggests uniform parts; the ETag check then asks for the
    # exact part sizes and re-hashes the local bytes instead of fetching again
    proxy, _ = proxies
    out = tmp_path / "nsd"
    report = download_nsd(nsd_opts(servers, out, sessions=[1], stimuli="none", captions="none"))
    data = servers["layout"][P.EXPDESIGN_KEY]
    assert report.per_file[P.EXPDESIGN_KEY]["restarts"] == 0
    assert proxy.sent(P.EXPDESIGN_KEY) == len(data)
    assert any("partNumber=3" in e["path"] for e in proxy.requests(P.EXPDESIGN_KEY, method="HEAD"))


def test_changed_object_restarts(servers, proxies, tmp_path):
    key = "test/changing.bin"
    ds.upload(servers["admin"], key, b"a" * 100_000)
    s3 = S3Source(endpoint_url=servers["proxy"].url)
    old = s3.remote(s3.head(key))
    ds.upload(servers["admin"], key, b"b" * 120_000)  # changes after the plan
    result = T.fetch(s3, old, tmp_path / "f.bin", policy=T.Policy(**FAST), refresh=lambda: s3.remote(s3.head(key)))
    assert (tmp_path / "f.bin").read_bytes() == b"b" * 120_000 and result.restarts == 1
    # a .part left by the old version is discarded, not glued to the new one
    ds.upload(servers["admin"], key, b"c" * 100_000)
    proxies[0].add("drop", key, n=70_000)
    with pytest.raises(DownloadError):
        T.fetch(s3, s3.remote(s3.head(key)), tmp_path / "g.bin", policy=T.Policy(retries=0, **FAST))
    assert T.part_paths(tmp_path / "g.bin")[0].stat().st_size == 65536
    ds.upload(servers["admin"], key, b"d" * 100_000)
    T.fetch(s3, s3.remote(s3.head(key)), tmp_path / "g.bin", policy=T.Policy(**FAST))
    assert (tmp_path / "g.bin").read_bytes() == b"d" * 100_000


def test_503_is_retried_with_back_off(servers, proxies, tmp_path):
    proxy, _ = proxies
    proxy.add("status", ROI, n=503, times=2)
    sleeps = []
    s3 = S3Source(endpoint_url=proxy.url)
    result = T.fetch(s3, s3.remote(s3.head(ROI)), tmp_path / "roi.nii.gz", policy=T.Policy(**FAST, sleep=sleeps.append))
    assert result.retries == 2 and sleeps == [0.001, 0.002]
    assert (tmp_path / "roi.nii.gz").read_bytes() == servers["layout"][ROI]


def test_403_on_a_required_file_fails_clearly(servers, proxies, tmp_path):
    proxy, _ = proxies
    proxy.add("status", ROI, n=403)
    out = tmp_path / "nsd"
    with pytest.raises(DownloadError) as err:
        download_nsd(nsd_opts(servers, out, sessions=[1], stimuli="none", captions="none", jobs=1))
    assert err.value.code == E.MISSING_OR_DENIED and ROI in str(err.value) and "403" in str(err.value)
    assert not (out / ROI).exists()
    # the bucket policy denies session 3's .hdf5
    with pytest.raises(DownloadError) as err:
        download_nsd(nsd_opts(servers, out, sessions=[3], betas="hdf5", stimuli="none", captions="none"))
    assert err.value.code == E.MISSING_OR_DENIED and "betas_session03.hdf5" in str(err.value)
    assert not (out / S3_H5).exists()


def test_full_disk_leaves_no_final_file(servers, proxies, tmp_path, monkeypatch):
    proxy, _ = proxies
    out = tmp_path / "nsd"
    opts = dict(sessions=[1], stimuli="none", captions="none", jobs=1)
    # 1. not enough space: refused before the first byte
    monkeypatch.setattr(P, "free_bytes", lambda path: 10_000)
    with pytest.raises(DownloadError) as err:
        download_nsd(nsd_opts(servers, out, **opts))
    assert err.value.code == E.NO_SPACE and "Nothing was downloaded" in str(err.value)
    assert object_gets(proxy) == []
    monkeypatch.undo()
    # 2. the disk fills up mid-file
    real_open = open
    written = {"n": 0}

    class Filling:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            written["n"] += len(data)
            if written["n"] > 100_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    monkeypatch.setattr(T, "open", lambda *a, **k: Filling(real_open(*a, **k)), raising=False)
    with pytest.raises(DownloadError) as err:
        download_nsd(nsd_opts(servers, out, **opts))
    assert err.value.code == E.NO_SPACE and "disk filled up" in str(err.value)
    finished = set(Manifest.load(out).files)
    assert all((out / k).exists() for k in finished)
    cut = [it for it in (P.EXPDESIGN_KEY, S1, ROI) if it not in finished]
    assert cut and all(not (out / k).exists() for k in cut)
    monkeypatch.undo()
    download_nsd(nsd_opts(servers, out, **opts))  # resumes and completes
    assert verify(out).ok


def test_verify_catches_a_flipped_byte_on_disk(servers, complete_root, tmp_path, capsys):
    out, _, _ = complete_root
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert main(["download", "verify", "--root", str(copy), "--no-progress"]) == 0
    with open(copy / S1, "r+b") as f:
        f.seek(1234)
        b = f.read(1)
        f.seek(1234)
        f.write(bytes([b[0] ^ 1]))
    (copy / ROI).unlink()
    capsys.readouterr()
    assert main(["download", "verify", "--root", str(copy), "--no-progress"]) == E.VERIFY_FAILED
    text = capsys.readouterr().out
    assert f"changed: {S1}" in text and f"missing: {ROI}" in text


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_subject_and_sessions(servers, tmp_path, capsys):
    out = str(tmp_path / "nsd")
    assert main(["download", "nsd", "--subject", "9", "--out", out, "--dry-run"]) == E.USAGE
    assert "1..8" in capsys.readouterr().err
    assert main(["download", "nsd", "--subject", "3", "--sessions", "30-33", "--out", out, "--dry-run"]) == E.USAGE
    err = capsys.readouterr().err
    assert "subject 3 has sessions 1-32" in err and "[33]" in err and "40 40 32 30 40 32 40 30" in err
    assert main(["download", "nsd", "--subject", "1", "--sessions", "41", "--out", out, "--dry-run"]) == E.USAGE
    assert "subject 1 has sessions 1-40" in capsys.readouterr().err
    assert main(["download", "nsd", "--subject", "1", "--sessions", "x", "--out", out]) == E.USAGE
    assert not Path(out).exists()


def test_terms_must_be_accepted_and_are_recorded(servers, proxies, tmp_path, monkeypatch, capsys):
    proxy, _ = proxies
    out = tmp_path / "nsd"
    argv = ["download", "nsd", "--subject", "1", "--sessions", "1", "--out", str(out), "--s3-endpoint", proxy.url,
            "--stimuli", "none", "--captions", "none", "--no-progress"]
    assert main(argv) == E.TERMS_NOT_ACCEPTED
    err = capsys.readouterr().err
    assert "--accept-nsd-terms" in err and "Terms-and-Conditions" in err and "cannot check" in err
    assert proxy.requests() == [] and not out.exists()
    monkeypatch.setenv("BRAIN_DIFFUSER_ACCEPT_NSD_TERMS", "1")
    assert main(argv) == 0
    terms = Manifest.load(out).doc["nsd_terms"]
    assert terms["by"] == "BRAIN_DIFFUSER_ACCEPT_NSD_TERMS=1" and terms["accepted_at"]


def test_out_on_a_read_only_disk(servers, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ro" / "nsd"
    real = Path.mkdir

    def read_only(self, *a, **k):
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", read_only)
    argv = ["download", "nsd", "--subject", "1", "--sessions", "1", "--out", str(out), "--accept-nsd-terms",
            "--s3-endpoint", servers["proxy"].url]
    assert main(argv) == E.NOT_WRITABLE
    assert "read-only" in capsys.readouterr().err


def test_root_holding_another_subjects_file(servers, proxies, tmp_path):
    out = tmp_path / "nsd"
    foreign = servers["other"]
    (out / S1).parent.mkdir(parents=True)
    shutil.copy(foreign, out / S1)
    with pytest.raises(DownloadError) as err:
        download_nsd(nsd_opts(servers, out, sessions=[1], stimuli="none", captions="none"))
    assert err.value.code == E.VERIFY_FAILED and S1 in str(err.value) and "another subject" in str(err.value)
    assert (out / S1).read_bytes() == foreign.read_bytes()  # not overwritten
    assert not any(p.name.endswith(".part") for p in out.rglob("*") if "betas_session01" in p.name)


def test_manifest_edited_by_hand(servers, complete_root, proxies, tmp_path, capsys):
    out, _, _ = complete_root
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    doc = json.loads((copy / MANIFEST_NAME).read_text())
    doc["files"][S1]["sha256"] = "0" * 64
    (copy / MANIFEST_NAME).write_text(json.dumps(doc))
    assert main(["download", "verify", "--root", str(copy), "--no-progress"]) == E.VERIFY_FAILED
    assert "edited by hand" in capsys.readouterr().out
    # a download run re-checks the files against the server instead of trusting or re-fetching them
    proxy, _ = proxies
    report = download_nsd(nsd_opts(servers, copy))
    assert report.files_adopted >= 10 and report.files_fetched <= 1  # the subset file is rebuilt from the remote
    assert [e for e in object_gets(proxy) if P.STIMULI_KEY not in e["path"]] == []
    assert verify(copy).ok


def test_html_instead_of_data(servers, proxies, tmp_path):
    proxy, _ = proxies
    out = tmp_path / "nsd"
    proxy.add("html", ROI)
    with pytest.raises(DownloadError) as err:
        download_nsd(nsd_opts(servers, out, sessions=[1], stimuli="none", captions="none", jobs=1))
    assert err.value.code == E.TRANSFER_FAILED and "HTML" in str(err.value) and ROI in str(err.value)
    assert not (out / ROI).exists()
    proxy.reset()
    proxy.add("html", "list-type", times=-1)
    with pytest.raises(DownloadError) as err:
        download_nsd(nsd_opts(servers, tmp_path / "nsd2", sessions=[1], stimuli="none", captions="none"))
    assert err.value.code == E.TRANSFER_FAILED


# ------------------------------------------------------------------------------------------------ weights
def weights_opts(servers, out, **kw) -> WeightsOptions:
    base = dict(out=Path(out), hf_endpoint=servers["hproxy"].url,
                vdvae_url=servers["hproxy"].url + "/vdvae/" + VDVAE_NAME, progress=False, jobs=2,
                policy=T.Policy(**FAST))
    base.update(kw)
    return WeightsOptions(**base)


def test_weights_models_json_rerun_and_faults(servers, proxies, tmp_path):
    _, hproxy = proxies
    out = tmp_path / "weights"
    assert main(["download", "weights", "--out", str(out), "--hf-endpoint", hproxy.url, "--vdvae-url",
                 hproxy.url + "/vdvae/" + VDVAE_NAME, "--dry-run", "--no-progress"]) == 0
    assert [e for e in hproxy.requests(method="GET") if "/api/" not in e["path"]] == [] and not out.exists()
    hproxy.reset()
    unet = "image_unet/diffusion_pytorch_model.bin"
    hproxy.add("drop", unet, n=100_000)  # resumes from the 64 KiB checkpoint
    hproxy.add("flip", "text_unet/diffusion_pytorch_model.bin", n=10)  # LFS sha256 catches it
    hproxy.add("flip", "vae/config.json", n=0)  # git blob sha1 catches it
    hproxy.add("drop", VDVAE_NAME, n=100_000)
    hproxy.add("ignore_range", VDVAE_NAME)  # the resumed request gets 200 + the whole file: restart from 0
    report = download_weights(weights_opts(servers, out))
    vd = out / "versatile-diffusion"
    for path, data in VD_FILES.items():
        skipped = path.startswith("pretrained_pth/") or path == "README.md"
        assert (vd / path).exists() != skipped, path
        if not skipped:
            assert (vd / path).read_bytes() == data
    assert (out / "vdvae" / VDVAE_NAME).read_bytes() == VDVAE_BYTES
    vdvae_gets = hproxy.requests(VDVAE_NAME, method="GET")
    assert [e["fault"] for e in vdvae_gets] == ["drop", "ignore_range"] and vdvae_gets[1]["range"] == "bytes=65536-199999"
    assert report.per_file["versatile-diffusion/text_unet/diffusion_pytorch_model.bin"]["restarts"] == 1
    assert report.per_file["versatile-diffusion/vae/config.json"]["restarts"] == 1
    unet_gets = [e for e in hproxy.requests(unet, method="GET")]
    assert [e["range"].split("-")[0] for e in unet_gets] == ["bytes=0", "bytes=65536"]
    models = json.loads((out / "models.json").read_text())
    assert Path(models["vdvae"]["path"]).read_bytes() == VDVAE_BYTES
    assert models["vdvae"]["sha256"] == hashlib.sha256(VDVAE_BYTES).hexdigest()
    assert models["versatile_diffusion"]["revision"] == VD_REVISION and Path(models["versatile_diffusion"]["path"]) == vd
    assert verify(out).ok
    tree = [e for e in hproxy.requests("/api/") if "/tree/" in e["path"]]
    assert len(tree) == 1
    hproxy.reset()
    again = download_weights(weights_opts(servers, out))
    assert again.files_fetched == 0 and again.fetched_bytes == 0
    assert [e for e in hproxy.requests(method="GET") if "/resolve/" in e["path"]] == []
