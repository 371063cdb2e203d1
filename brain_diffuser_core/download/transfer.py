"""One resumable transfer loop for every source (S3, plain HTTP(S), the hub's resolve URLs).

``<dest>.part`` holds the bytes received; ``<dest>.part.json`` (the state) lists the MD5 of every finished
block. A block is an S3 multipart part when the object is multipart (so the ETag can be checked), else
``Policy.checkpoint_bytes``. After each block the part file is fsynced and the state saved, so:

* a dropped stream or a 5xx is retried with exponential back-off from the last block boundary;
* a killed process resumes on the next run: the prefix is cut back to the last recorded block and re-hashed
  (a block whose bytes changed on disk is fetched again);
* ``If-Match`` on the ETag makes a changed object answer 412: the file restarts from byte 0 with the new version;
* a 200 to a ranged request (Range ignored) restarts from byte 0 with that very response.

At the end: size, then the strongest check the source allows (MD5 of a single-part ETag or ``Content-MD5``,
the multipart ETag, the hub's LFS sha256 or git blob sha1), fsync, ``os.replace`` onto the final name.
Nothing under the final name is ever incomplete.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

from .errors import MISSING_OR_DENIED, NO_SPACE, TRANSFER_FAILED, VERIFY_FAILED, DownloadError

__all__ = ["Remote", "Response", "Source", "Policy", "FetchResult", "fetch", "read_range", "RemoteError",
           "Transient", "Changed", "Denied", "Missing", "NotData", "part_paths", "multipart_etag", "check_local"]


# -- what a source raises ------------------------------------------------------------------------------------
class RemoteError(Exception):
    """A remote answered something other than the bytes asked for."""


class Transient(RemoteError):
    """Worth retrying: 5xx, a dropped or short stream, a timeout, a refused connection."""


class Changed(RemoteError):
    """412: the object is no longer the version planned (its ETag changed)."""


class Denied(RemoteError):
    """403."""


class Missing(RemoteError):
    """404."""


class NotData(RemoteError):
    """A page (HTML) or another answer that cannot be the file."""


@dataclass
class Remote:
    """One remote file as planned. ``size`` in bytes; expected checksums are hex strings."""

    display: str  # what messages show: s3://bucket/key or the URL
    key: str  # S3 key or URL
    size: int
    etag: str | None = None
    md5: str | None = None  # of the whole content (single-part S3 ETag, Content-MD5)
    sha256: str | None = None  # hub LFS oid, or a pinned sha256
    git_sha1: str | None = None  # hub non-LFS file: git blob id
    part_size: int | None = None  # S3 multipart: size of part 1 (assumed uniform until the ETag says otherwise)
    parts_count: int | None = None
    part_sizes: list[int] | None = None  # S3 multipart with parts of different sizes: every part's size
    if_match: bool = True  # send If-Match: the ETag (not for redirecting hub URLs)

    @property
    def multipart(self) -> bool:
        return bool(self.etag) and "-" in self.etag.strip('"')

    @property
    def check(self) -> str:
        """Which content check the transfer will make (for the plan and the manifest)."""
        if self.sha256:
            return "sha256"
        if self.md5:
            return "md5"
        if self.multipart and (self.part_size or self.part_sizes):
            return "etag-multipart"
        if self.git_sha1:
            return "git-sha1"
        return "size"


class Response(Protocol):
    status: int  # 206, or 200 when the Range was ignored
    start: int  # first byte offset of the body

    def chunks(self) -> Iterator[bytes]: ...  # raises Transient when the stream drops

    def close(self) -> None: ...


class Source(Protocol):
    name: str

    def open_range(self, remote: Remote, start: int, end: int) -> Response: ...

    def part_sizes(self, remote: Remote) -> list[int] | None: ...


@dataclass
class Policy:
    retries: int = 8  # consecutive failures without progress before giving up
    backoff_s: float = 0.5  # first back-off; doubles, capped at backoff_max_s
    backoff_max_s: float = 30.0
    max_restarts: int = 2  # whole-file restarts on a checksum mismatch or a changed object
    checkpoint_bytes: int = 8 << 20  # block size when the object is not multipart
    sleep: Callable[[float], None] = time.sleep

    def back_off(self, fails: int) -> None:
        """Sleep before retry number ``fails`` (1, 2, ...): backoff_s, doubling, capped."""
        self.sleep(min(self.backoff_max_s, self.backoff_s * 2 ** (fails - 1)))


@dataclass
class FetchResult:
    sha256: str
    size: int
    fetched: int  # bytes received over the network (all attempts)
    resumed_from: int  # bytes kept from an earlier run
    restarts: int
    retries: int
    check: str  # what the content was checked against
    warnings: list[str] = field(default_factory=list)


def part_paths(dest: Path) -> tuple[Path, Path]:
    """(``<dest>.part``, ``<dest>.part.json``)."""
    return dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".part.json")


def multipart_etag(part_md5s: list[bytes]) -> str:
    """S3's multipart ETag: md5 of the concatenated binary part MD5s, then ``-N``."""
    return f"{hashlib.md5(b''.join(part_md5s)).hexdigest()}-{len(part_md5s)}"


def _block_ends(size: int, block: int) -> list[int]:
    ends = list(range(block, size, block))
    return ends + [size] if size else [0]


def _remote_ends(remote: Remote, checkpoint_bytes: int) -> tuple[list[int], str]:
    """(block end offsets, a key naming the blocking for the state file): S3 parts when multipart."""
    if remote.multipart and remote.part_sizes:
        ends, pos = [], 0
        for n in remote.part_sizes:
            pos += int(n)
            ends.append(pos)
        return ends, "parts:" + hashlib.sha256(json.dumps(remote.part_sizes).encode()).hexdigest()[:16]
    block = int(remote.part_size) if (remote.multipart and remote.part_size) else int(checkpoint_bytes)
    return _block_ends(remote.size, block), f"block:{block}"


class _Hashes:
    """Running hashes of the file; copied at each block boundary so a drop rewinds exactly."""

    def __init__(self, remote: Remote):
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5() if remote.md5 else None
        self.git = None
        if remote.git_sha1:
            self.git = hashlib.sha1()
            self.git.update(b"blob %d\0" % remote.size)

    def update(self, data: bytes) -> None:
        self.sha256.update(data)
        if self.md5 is not None:
            self.md5.update(data)
        if self.git is not None:
            self.git.update(data)

    def copy(self) -> "_Hashes":
        new = object.__new__(_Hashes)
        new.sha256 = self.sha256.copy()
        new.md5 = self.md5.copy() if self.md5 is not None else None
        new.git = self.git.copy() if self.git is not None else None
        return new


class _Mismatch(Exception):
    pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _no_space(dest: Path, err: OSError) -> DownloadError:
    return DownloadError(
        NO_SPACE,
        f"{dest}: the disk filled up while writing ({err.strerror}). Nothing was renamed onto the final name; "
        f"the partial file {dest.name}.part is kept. Free space on {dest.parent} (or choose another --out) "
        "and re-run: the transfer resumes.",
    )


def _remote_error(remote: Remote, dest: Path, err: RemoteError) -> DownloadError:
    if isinstance(err, Denied):
        return DownloadError(
            MISSING_OR_DENIED,
            f"{remote.display}: the server refuses this file (403: {err}). NSD's bucket is public and read with "
            "unsigned requests; a 403 means a mirror or --s3-endpoint that does not serve it, or a key the "
            f"bucket does not publish. Nothing was written to {dest}.",
        )
    if isinstance(err, Missing):
        return DownloadError(
            MISSING_OR_DENIED,
            f"{remote.display}: not found on the server (404). Check the subject/sessions, --s3-endpoint or the "
            f"URL. Nothing was written to {dest}.",
        )
    if isinstance(err, NotData):
        return DownloadError(
            TRANSFER_FAILED,
            f"{remote.display}: the server answered something that is not the file ({err}); a captive portal, "
            f"proxy login page or a wrong endpoint? Nothing was written to {dest}.",
        )
    return DownloadError(
        TRANSFER_FAILED,
        f"{remote.display}: the server kept failing ({err}). What was received is kept in {dest.name}.part; "
        "re-run later to resume.",
    )


class _Transfer:
    def __init__(self, source: Source, remote: Remote, dest: Path, policy: Policy, on_bytes, warn):
        self.source, self.remote, self.dest, self.policy = source, remote, Path(dest), policy
        self.on_bytes = on_bytes or (lambda n: None)
        self.warn = warn or (lambda msg: None)
        self.part, self.state_path = part_paths(self.dest)
        self.fetched = 0
        self.retries = 0
        self.resumed_from = 0

    # -- state -------------------------------------------------------------------------------------------
    def _ends(self) -> tuple[list[int], str]:
        return _remote_ends(self.remote, self.policy.checkpoint_bytes)

    def _state_doc(self, block_md5: list[str]) -> dict:
        return {"source": self.remote.display, "etag": self.remote.etag, "size": self.remote.size,
                "block": self._ends()[1], "block_md5": block_md5}

    def _save_state(self, block_md5: list[str]) -> None:
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_text(json.dumps(self._state_doc(block_md5)))
        os.replace(tmp, self.state_path)

    def _discard(self) -> None:
        for p in (self.part, self.state_path):
            if p.exists():
                p.unlink()

    def _resume_prefix(self) -> tuple[int, _Hashes, list[str]]:
        """Keep the recorded blocks of an earlier run whose bytes still hash the same; returns
        (bytes kept, hashes over them, their block MD5s)."""
        hashes = _Hashes(self.remote)
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            state = None
        expected = self._state_doc([])
        if (not state or not self.part.is_file()
                or any(state.get(k) != expected[k] for k in ("source", "etag", "size", "block"))):
            self._discard()
            return 0, hashes, []
        ends = self._ends()[0]
        kept: list[str] = []
        pos = 0
        with open(self.part, "rb") as f:
            for i, recorded in enumerate(state.get("block_md5", [])[: len(ends)]):
                data = f.read(ends[i] - pos)
                if len(data) != ends[i] - pos or hashlib.md5(data).hexdigest() != recorded:
                    break
                hashes.update(data)
                kept.append(recorded)
                pos = ends[i]
        with open(self.part, "r+b") as f:
            f.truncate(pos)
        return pos, hashes, kept

    # -- streaming ---------------------------------------------------------------------------------------
    def _back_off(self, err: Exception) -> None:
        self.retries += 1
        self._fails += 1
        if self._fails > self.policy.retries:
            raise err
        self.policy.back_off(self._fails)

    def _stream(self) -> tuple[_Hashes, list[str]]:
        size = self.remote.size
        pos, hashes, block_md5 = self._resume_prefix()
        self.resumed_from = max(self.resumed_from, pos)
        ends = self._ends()[0]
        ckpt_pos, ckpt_hashes = pos, hashes.copy()
        self._fails = 0
        mode = "r+b" if self.part.exists() else "wb"
        with open(self.part, mode) as f:
            f.seek(pos)
            block = hashlib.md5()
            while pos < size:
                try:
                    resp = self.source.open_range(self.remote, pos, size - 1)
                except Transient as err:
                    self._back_off(err)
                    continue
                try:
                    if resp.start != pos:
                        if resp.start != 0:
                            raise NotData(f"asked for bytes from {pos}, got a body starting at {resp.start}")
                        # Range ignored: start over with this very response
                        self.warn(f"{self.remote.display}: the server ignored the Range request; restarting from 0")
                        pos, hashes, block_md5, block = 0, _Hashes(self.remote), [], hashlib.md5()
                        ckpt_pos, ckpt_hashes = 0, hashes.copy()
                        f.seek(0)
                        f.truncate()
                    k = len(block_md5)
                    for chunk in resp.chunks():
                        while chunk:
                            if k >= len(ends):
                                raise NotData(f"the body is longer than the planned {size} bytes")
                            take = min(len(chunk), ends[k] - pos)
                            piece, chunk = chunk[:take], chunk[take:]
                            f.write(piece)
                            hashes.update(piece)
                            block.update(piece)
                            pos += take
                            self.fetched += take
                            self.on_bytes(take)
                            if pos == ends[k]:
                                f.flush()
                                os.fsync(f.fileno())
                                block_md5.append(block.hexdigest())
                                self._save_state(block_md5)
                                block = hashlib.md5()
                                ckpt_pos, ckpt_hashes = pos, hashes.copy()
                                self._fails = 0
                                k += 1
                    if pos < size:
                        raise Transient(f"the stream ended at byte {pos} of {size}")
                except Transient as err:
                    # back to the last block boundary: the unfinished block is fetched again
                    self.on_bytes(ckpt_pos - pos)
                    pos, hashes, block = ckpt_pos, ckpt_hashes.copy(), hashlib.md5()
                    f.seek(pos)
                    f.truncate()
                    self._back_off(err)
                finally:
                    resp.close()
            f.flush()
            os.fsync(f.fileno())
        return hashes, block_md5

    def _check(self, hashes: _Hashes, block_md5: list[str]) -> str:
        return _verify(self.source, self.remote, self.part, hashes, block_md5)

    def run(self, refresh: Callable[[], Remote] | None) -> FetchResult:
        restarts = 0
        warnings: list[str] = []
        if self.remote.check == "size":
            warnings.append(f"{self.remote.display}: the server gives no checksum (ETag {self.remote.etag}): "
                            "checked by size only; the manifest's sha256 guards the copy from now on")
            self.warn(warnings[-1])
        while True:
            try:
                hashes, block_md5 = self._stream()
                check = self._check(hashes, block_md5)
                break
            except Changed as err:
                if refresh is None or restarts >= self.policy.max_restarts:
                    raise DownloadError(
                        TRANSFER_FAILED,
                        f"{self.remote.display}: the object changed during the download ({err}); re-run to fetch "
                        "the new version",
                    ) from None
                self.warn(f"{self.remote.display}: changed on the server (412); restarting with the new version")
                self.remote = refresh()
            except _Mismatch as err:
                if restarts >= self.policy.max_restarts:
                    self._discard()
                    raise DownloadError(
                        VERIFY_FAILED,
                        f"{self.remote.display}: the received bytes fail the check ({err}) after {restarts + 1} "
                        f"tries; nothing was written to {self.dest}. A proxy that alters data, or a changed "
                        "object: re-run, or try another network or endpoint.",
                    ) from None
                self.warn(f"{self.remote.display}: {err}; fetching it again")
            except RemoteError as err:
                raise _remote_error(self.remote, self.dest, err) from None
            except OSError as err:
                if err.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise _no_space(self.dest, err) from None
                raise
            restarts += 1
            self._discard()
        os.replace(self.part, self.dest)
        _fsync_dir(self.dest.parent)
        if self.state_path.exists():
            self.state_path.unlink()
        return FetchResult(hashes.sha256.hexdigest(), self.remote.size, self.fetched, self.resumed_from, restarts,
                           self.retries, check, warnings)


def _verify(source: Source, r: Remote, path: Path, hashes: _Hashes, block_md5: list[str]) -> str:
    """Raise _Mismatch unless ``path`` (hashed as ``hashes`` / ``block_md5``) is ``r``; returns the check made."""
    got = path.stat().st_size
    if got != r.size:
        raise _Mismatch(f"size {got} B, expected {r.size} B")
    if r.sha256 and hashes.sha256.hexdigest() != r.sha256:
        raise _Mismatch(f"sha256 {hashes.sha256.hexdigest()}, expected {r.sha256}")
    if r.md5 and hashes.md5.hexdigest() != r.md5:
        raise _Mismatch(f"MD5 {hashes.md5.hexdigest()}, expected {r.md5}")
    if r.git_sha1 and hashes.git.hexdigest() != r.git_sha1:
        raise _Mismatch(f"git blob sha1 {hashes.git.hexdigest()}, expected {r.git_sha1}")
    if r.multipart and (r.part_size or r.part_sizes) and not r.sha256:
        want = r.etag.strip('"')
        if multipart_etag([bytes.fromhex(h) for h in block_md5]) != want:
            # parts may not be uniform: ask for the exact part sizes and re-hash the local bytes
            sizes = source.part_sizes(r)
            if not sizes or local_multipart_etag(path, sizes) != want:
                raise _Mismatch(f"multipart ETag differs from {r.etag}")
    return r.check


def check_local(source: Source, remote: Remote, path, checkpoint_bytes: int = 8 << 20) -> tuple[bool, str, str]:
    """Is the local file ``path`` the remote file? ``(matches, sha256, why not)``: one read of the file."""
    path = Path(path)
    hashes = _Hashes(remote)
    size = path.stat().st_size
    if size != remote.size:
        return False, "", f"size {size} B, the server's is {remote.size} B"
    block_md5 = []
    with open(path, "rb") as f:
        for end in _remote_ends(remote, checkpoint_bytes)[0]:
            h = hashlib.md5()
            left = end - f.tell()
            while left:
                data = f.read(min(left, 1 << 22))
                if not data:
                    break
                h.update(data)
                hashes.update(data)
                left -= len(data)
            block_md5.append(h.hexdigest())
    try:
        _verify(source, remote, path, hashes, block_md5)
    except _Mismatch as err:
        return False, hashes.sha256.hexdigest(), str(err)
    return True, hashes.sha256.hexdigest(), ""


def local_multipart_etag(path: Path, part_sizes: list[int]) -> str:
    """The multipart ETag of a local file cut into ``part_sizes`` (bytes each)."""
    digests = []
    with open(path, "rb") as f:
        for n in part_sizes:
            h = hashlib.md5()
            left = n
            while left:
                data = f.read(min(left, 1 << 22))
                if not data:
                    break
                h.update(data)
                left -= len(data)
            digests.append(h.digest())
    return multipart_etag(digests)


def fetch(source: Source, remote: Remote, dest, *, policy: Policy | None = None,
          on_bytes: Callable[[int], None] | None = None, warn: Callable[[str], None] | None = None,
          refresh: Callable[[], Remote] | None = None) -> FetchResult:
    """Download ``remote`` to ``dest`` (resuming an earlier ``dest.part``), verify it, rename it into place.

    ``on_bytes(n)`` is called with every chunk's byte count (negative when a drop rewinds to a boundary);
    ``refresh()`` returns the remote re-planned after a 412. Raises :class:`DownloadError`.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    return _Transfer(source, remote, dest, policy or Policy(), on_bytes, warn).run(refresh)


def read_range(source: Source, remote: Remote, start: int, end: int, policy: Policy | None = None,
               counter: Callable[[int], None] | None = None) -> bytes:
    """Bytes ``start..end`` (inclusive) of ``remote`` in memory, retried with back-off like :func:`fetch`."""
    policy = policy or Policy()
    fails = 0
    while True:
        resp = None
        try:
            resp = source.open_range(remote, start, end)
            if resp.start != start or resp.status != 206 and not (start == 0 and end == remote.size - 1):
                raise NotData("the server ignores Range requests (answered 200 with the whole file); reading part "
                              "of a file needs them")
            out = bytearray()
            for chunk in resp.chunks():
                out += chunk
                if counter:
                    counter(len(chunk))
                if len(out) > end - start + 1:
                    raise NotData(f"asked for {end - start + 1} bytes, got more")
            if len(out) != end - start + 1:
                raise Transient(f"short body: {len(out)} of {end - start + 1} bytes")
            return bytes(out)
        except Transient as err:
            fails += 1
            if fails > policy.retries:
                raise _remote_error(remote, Path(remote.key), err) from None
            policy.back_off(fails)
        except RemoteError as err:
            raise _remote_error(remote, Path(remote.key), err) from None
        finally:
            if resp is not None:
                resp.close()
