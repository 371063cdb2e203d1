"""What `download nsd` fetches, measured on loopback: the dry-run plan, bytes received vs file bytes (clean
run, a run with two dropped streams, a 1% stimulus subset), and the time of a re-run over a complete folder.

Everything runs against a moto S3 server holding an NSD-format fixture written with the project's writers
(tests/nsd_fixtures.py: subject 1, a (6, 7, 5) volume, so sizes are the fixture's, not NSD's), behind the
fault-injecting proxy of the tests. The default 37 sessions are uploaded (the same fixture session under each
key) so the plan has the shape a user sees.

    python benchmarks/download_transfer.py
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ["S3_UPLOAD_PART_MIN_SIZE"] = "256"

import numpy as np  # noqa: E402

import download_servers as ds  # noqa: E402
from nsd_fixtures import make_nsd_tree  # noqa: E402


def main() -> None:
    from brain_diffuser_core.__main__ import main as cli
    from brain_diffuser_core.download import plan as P
    from brain_diffuser_core.download import transfer as T
    from brain_diffuser_core.download.run import NSDOptions, download_nsd
    from brain_diffuser_core.download.s3 import S3Source
    from brain_diffuser_core.download.stimuli import fetch_subset
    from brain_diffuser_core.nsd_format import NSDPaths

    tmp = Path(tempfile.mkdtemp(prefix="bd-download-bench-"))
    fx = make_nsd_tree(tmp / "remote", subject=1, n_sessions=1, n_stimuli_images=6)
    moto, moto_url = ds.start_moto()
    admin = ds.admin_client(moto_url)
    ds.create_public_bucket(admin)
    betas = NSDPaths(fx.root, 1).betas_nifti(1).read_bytes()
    sizes = {}
    for path in sorted(p for p in fx.root.rglob("*") if p.is_file() and "annotations" not in p.parts):
        key = str(path.relative_to(fx.root))
        data = path.read_bytes()
        ds.upload(admin, key, data, ds.uniform_parts(len(data), 16 << 10) if len(data) > 32 << 10 else None)
        sizes[key] = len(data)
    session_key = str(NSDPaths(fx.root, 1).betas_nifti(1).relative_to(fx.root))
    for s in range(2, 38):  # the default sessions 1-37: the fixture's session under each key
        ds.upload(admin, session_key.replace("session01", f"session{s:02d}"), betas,
                  ds.uniform_parts(len(betas), 16 << 10))
    proxy, _ = ds.start_proxy(moto_url)
    fast = T.Policy(backoff_s=0.001, backoff_max_s=0.01)

    print("=" * 100)
    print("1. dry run, subject 1, defaults (sizes are the test fixture's, not NSD's)")
    print("$ python -m brain_diffuser_core download nsd --subject 1 --out ROOT --captions none --dry-run "
          "--s3-endpoint URL")
    out = tmp / "nsd"
    proxy.reset()
    cli(["download", "nsd", "--subject", "1", "--out", str(out), "--captions", "none", "--dry-run",
         "--s3-endpoint", proxy.url])
    data_gets = [e for e in proxy.log if e["method"] == "GET" and "list-type" not in e["path"]]
    print(f"requests: {len(proxy.log)} ({len(data_gets)} data requests)")

    def run(out_dir, **kw):  # the plan table goes to a buffer: it was shown once above
        with contextlib.redirect_stderr(io.StringIO()):
            return download_nsd(NSDOptions(subject=1, out=out_dir, s3_endpoint=proxy.url, captions="none",
                                           accept_terms=True, progress=False, policy=fast, **kw))

    print("=" * 100)
    print("2. bytes received vs file bytes")
    proxy.reset()
    report = run(out / "clean", stimuli="none")
    file_bytes = sum(it.size for it in report.plan.items)
    sent = proxy.sent()
    print(f"clean run: {len(report.plan.items)} files, {file_bytes:,} B of files, {sent:,} B received: "
          f"ratio {sent / file_bytes:.3f}")
    proxy.reset()
    proxy.add("drop", session_key, n=40_000, times=2)
    report = run(out / "drops", sessions=[1], stimuli="none")
    got = proxy.sent(session_key)
    print(f"two drops (after 40,000 B each) on a {sizes[session_key]:,} B file of 16 KiB parts: {got:,} B "
          f"received: ratio {got / sizes[session_key]:.3f}; Range starts "
          + ", ".join(e["range"].split("=")[1].split("-")[0] for e in proxy.requests(session_key, "GET")))

    # a 1% subset of a 73,000-image contiguous imgBrick (8 px images here: 14 MB; NSD's are 425 px)
    import h5py

    rng = np.random.default_rng(0)
    path = tmp / "stimuli-8px.hdf5"
    with h5py.File(path, "w") as f:
        f.create_dataset("imgBrick", data=rng.integers(0, 256, (73000, 8, 8, 3), dtype=np.uint8))
    ds.upload(admin, "bench/nsd_stimuli_8px.hdf5", path.read_bytes(), ds.uniform_parts(path.stat().st_size, 8 << 20))
    s3 = S3Source(endpoint_url=proxy.url)
    remote = s3.remote(s3.head("bench/nsd_stimuli_8px.hdf5"))
    ids = np.sort(rng.choice(73000, 730, replace=False))
    t = time.perf_counter()
    for _ in range(20):  # baseline: one ranged GET of one image, through the same proxy
        s3.client.get_object(Bucket=ds.BUCKET, Key="bench/nsd_stimuli_8px.hdf5", Range="bytes=4096-4287")["Body"].read()
    per_get = (time.perf_counter() - t) / 20
    proxy.reset()
    t = time.perf_counter()
    result = fetch_subset(s3, remote, tmp / "subset.hdf5", ids, policy=fast, jobs=4)
    dt = time.perf_counter() - t
    got = proxy.sent("bench/")
    print(f"1% subset ({ids.size} of 73,000 images, {result.image_bytes} B each): {got:,} B received of a "
          f"{remote.size:,} B file: {got / remote.size:.4f} of the file; pixels {result.data_bytes:,} B "
          f"(= {ids.size} x {result.image_bytes}) in {result.requests} requests, HDF5 metadata "
          f"{result.metadata_bytes:,} B; {dt:.1f} s = {dt / (result.requests * per_get):.2f} x (requests x one "
          f"ranged GET through the proxy, {per_get * 1000:.0f} ms here: loopback moto latency, not S3's)")
    with h5py.File(tmp / "subset.hdf5", "r") as a, h5py.File(path, "r") as b:
        assert all(np.array_equal(a["imgBrick"][i], b["imgBrick"][i]) for i in ids[:50])

    print("=" * 100)
    print("3. re-run over a complete folder")
    report = run(out / "complete", stimuli="subset")
    proxy.reset()
    t = time.perf_counter()
    again = run(out / "complete", stimuli="subset")
    dt = time.perf_counter() - t
    kinds = {}
    for e in proxy.log:
        kind = "list" if "list-type" in e["path"] else e["method"]
        kinds[kind] = kinds.get(kind, 0) + 1
    print(f"re-run: {dt:.2f} s, {again.files_present} files present, {again.files_fetched} fetched, "
          f"{again.fetched_bytes} B received; requests {kinds}")
    t = time.perf_counter()
    cli(["download", "verify", "--root", str(out / "complete"), "--no-progress"])
    print(f"offline verify of the same folder: {time.perf_counter() - t:.2f} s")
    moto.stop()


if __name__ == "__main__":
    main()
