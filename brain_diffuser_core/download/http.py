"""Plain HTTP(S) files (the VDVAE checkpoint, COCO captions) and the Hugging Face hub's tree + resolve routes.

Both go through :func:`brain_diffuser_core.download.transfer.fetch`. The hub listing comes from
``huggingface_hub.HfApi.list_repo_tree`` (one request at a pinned 40-character revision); its sizes, LFS
sha256 and git blob ids are the checks, so no HEAD per file is needed. huggingface_hub's own downloader is not
used: it restarts a file from zero after any failure and checks sizes only.
"""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from .errors import USAGE, DownloadError
from .transfer import Changed, Denied, Missing, NotData, Remote, Transient

__all__ = ["HTTPSource", "HubFile", "hub_files", "hub_resolve_url"]


def _content_md5_hex(value: str | None) -> str | None:
    if not value:
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 16 else None


def _status_error(url: str, status: int, reason: str = "") -> Exception | None:
    what = f"{url}: HTTP {status} {reason}".strip()
    if status == 412:
        return Changed(what)
    if status in (401, 403):
        return Denied(what)
    if status == 404:
        return Missing(what)
    if status == 429 or status >= 500:
        return Transient(what)
    if status >= 400:
        return NotData(what)
    return None


def _not_html(url: str, headers) -> None:
    ctype = str(headers.get("Content-Type") or "")
    if ctype.startswith("text/html") and not url.split("?")[0].endswith((".html", ".htm")):
        raise NotData(f"{url}: answered with an HTML page (Content-Type {ctype})")


class _HTTPResponse:
    def __init__(self, resp, start: int):
        self._resp = resp
        self.status = resp.status_code
        self.start = start if resp.status_code == 206 else 0

    def chunks(self):
        import requests
        import urllib3.exceptions as uex

        try:
            for data in self._resp.iter_content(32 << 10):  # small reads: a stalled stream delivers what it sent
                if data:
                    yield data
        except (requests.exceptions.RequestException, uex.HTTPError, ConnectionError, TimeoutError) as err:
            raise Transient(f"stream dropped: {err}") from None

    def close(self) -> None:
        self._resp.close()


class HTTPSource:
    """GET/HEAD over one ``requests`` session (environment proxies honoured)."""

    name = "https"

    def __init__(self, timeout_s: float = 60.0):
        import requests

        self.session = requests.Session()
        self.timeout_s = timeout_s

    def _request(self, method: str, url: str, **kw):
        import requests

        try:
            return self.session.request(method, url, timeout=self.timeout_s, allow_redirects=True, **kw)
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as err:
            raise Transient(f"{url}: {err}") from None

    def head(self, url: str, *, sha256: str | None = None) -> Remote:
        """Size, ETag and ``Content-MD5`` of ``url``; ``sha256``: a pinned checksum to check as well."""
        resp = self._request("HEAD", url)
        err = _status_error(url, resp.status_code, resp.reason)
        if err:
            raise err
        _not_html(url, resp.headers)
        if "Content-Length" not in resp.headers:
            raise NotData(f"{url}: the server gives no Content-Length; its size cannot be planned")
        return Remote(display=url, key=url, size=int(resp.headers["Content-Length"]), etag=resp.headers.get("ETag"),
                      md5=_content_md5_hex(resp.headers.get("Content-MD5")), sha256=sha256)

    def open_range(self, remote: Remote, start: int, end: int) -> _HTTPResponse:
        headers = {"Range": f"bytes={start}-{end}", "Accept-Encoding": "identity"}
        if remote.if_match and remote.etag:
            headers["If-Match"] = remote.etag
        resp = self._request("GET", remote.key, headers=headers, stream=True)
        err = _status_error(remote.key, resp.status_code, resp.reason)
        if err:
            resp.close()
            raise err
        try:
            _not_html(remote.key, resp.headers)
        except NotData:
            resp.close()
            raise
        return _HTTPResponse(resp, start)

    def part_sizes(self, remote: Remote) -> None:
        return None


@dataclass(frozen=True)
class HubFile:
    path: str
    size: int
    sha256: str | None  # LFS files
    git_sha1: str | None  # other files


def hub_files(endpoint: str | None, repo: str, revision: str) -> list[HubFile]:
    """Every file of ``repo`` at ``revision`` (recursive tree listing; never reads a token)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        entries = list(HfApi(endpoint=endpoint, token=False).list_repo_tree(repo, revision=revision, recursive=True))
    except OfflineModeIsEnabled:
        raise DownloadError(USAGE, "HF_HUB_OFFLINE is set in the environment (huggingface_hub reads it at import): "
                                   "unset it for `download weights`") from None
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", 0) or 0
        raise (_status_error(f"{endpoint or 'the hub'} {repo}@{revision}", status) or NotData(str(err))) from None
    except ValueError as err:  # not JSON (an HTML page)
        raise NotData(f"{endpoint or 'the hub'}: the tree listing of {repo} is not JSON ({err})") from None
    except OSError as err:
        raise Transient(f"{endpoint or 'the hub'}: {err}") from None
    out = []
    for e in entries:
        if not hasattr(e, "size"):  # folders
            continue
        lfs = getattr(e, "lfs", None)
        out.append(HubFile(e.path, int(e.size), lfs.sha256 if lfs else None, None if lfs else e.blob_id))
    return out


def hub_resolve_url(endpoint: str | None, repo: str, revision: str, path: str) -> str:
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo, path, revision=revision, endpoint=endpoint)
