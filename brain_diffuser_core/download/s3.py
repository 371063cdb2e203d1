"""NSD's public S3 bucket through boto3, always unsigned.

A signed request is also checked against the caller's own IAM policy (why users of the original script get
403 until they add ``--no-sign-request``), so credentials are never looked up. botocore's own retries are off:
the transfer loop retries (dropped streams raise ``ResponseStreamingError``, which botocore never retries).
"""
from __future__ import annotations

from dataclasses import dataclass

from .transfer import Changed, Denied, Missing, NotData, Remote, Transient

__all__ = ["NSD_BUCKET", "NSD_REGION", "S3Source", "S3Object"]

NSD_BUCKET = "natural-scenes-dataset"
NSD_REGION = "us-east-2"
#: bytes per read of a response body: small enough that a stalled stream has delivered what it sent
_READ_BYTES = 32 << 10


@dataclass(frozen=True)
class S3Object:
    key: str
    size: int
    etag: str


def _md5_of_etag(etag: str | None) -> str | None:
    """A single-part upload's ETag is the MD5 of the content (32 hex digits); anything else is opaque."""
    e = (etag or "").strip('"')
    return e.lower() if len(e) == 32 and all(c in "0123456789abcdefABCDEF" for c in e) else None


_SESSION = []


def _session():
    """One boto3 session per process: it parses botocore's S3 model once (0.8 s), not per client."""
    import boto3

    if not _SESSION:
        _SESSION.append(boto3.session.Session())
    return _SESSION[0]


class _S3Response:
    def __init__(self, resp: dict, start: int):
        self._resp = resp
        self.status = int(resp["ResponseMetadata"]["HTTPStatusCode"])
        self.start = start if self.status == 206 else 0

    def chunks(self):
        import botocore.exceptions as bex
        import urllib3.exceptions as uex

        body = self._resp["Body"]
        try:
            while True:
                data = body.read(_READ_BYTES)
                if not data:
                    return
                yield data
        except (bex.ResponseStreamingError, bex.IncompleteReadError, bex.ReadTimeoutError,
                bex.ConnectionClosedError, uex.HTTPError, ConnectionError, TimeoutError) as err:
            raise Transient(f"stream dropped: {err}") from None

    def close(self) -> None:
        try:
            self._resp["Body"].close()
        except Exception:
            pass


class S3Source:
    """Reads ``bucket`` unsigned, from ``endpoint_url`` (None: AWS) with a connection pool for ``jobs``."""

    def __init__(self, bucket: str = NSD_BUCKET, endpoint_url: str | None = None, region: str = NSD_REGION,
                 jobs: int = 4, timeout_s: float = 60.0):
        import botocore
        from botocore.config import Config

        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.name = f"s3://{bucket}" + (f" at {endpoint_url}" if endpoint_url else "")
        config = Config(signature_version=botocore.UNSIGNED, retries={"total_max_attempts": 1, "mode": "standard"},
                        connect_timeout=timeout_s, read_timeout=timeout_s, max_pool_connections=max(4, jobs + 2))
        self.client = _session().client("s3", region_name=region, endpoint_url=endpoint_url, config=config)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    # -- errors --------------------------------------------------------------------------------------------
    def _translate(self, err: Exception, what: str) -> Exception:
        import botocore.exceptions as bex

        if isinstance(err, bex.ClientError):
            status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            code = err.response.get("Error", {}).get("Code", "")
            msg = f"{what}: {status} {code}".strip()
            if status == 412 or code == "PreconditionFailed":
                return Changed(msg)
            if status == 403 or code == "AccessDenied":
                return Denied(msg)
            if status == 404 or code in ("NoSuchKey", "NoSuchBucket", "NotFound"):
                return Missing(msg)
            if status >= 500 or code in ("SlowDown", "ServiceUnavailable", "InternalError"):
                return Transient(msg)
            if status == 200:  # botocore could not parse a 200 answer (an HTML page instead of XML)
                return NotData(f"{what}: {code or 'unparsable answer'}")
            return NotData(msg)
        if isinstance(err, bex.ResponseParserError):
            return NotData(f"{what}: the answer is not S3 XML ({str(err)[:120]})")
        if isinstance(err, (bex.EndpointConnectionError, bex.ConnectionClosedError, bex.ReadTimeoutError,
                            bex.ConnectTimeoutError, bex.ResponseStreamingError, bex.IncompleteReadError)):
            return Transient(f"{what}: {err}")
        return err

    def _call(self, what: str, fn, **kw):
        try:
            return fn(**kw)
        except Exception as err:  # botocore raises many types; _translate keeps what it does not know
            new = self._translate(err, what)
            if new is err:
                raise
            raise new from None

    # -- metadata ------------------------------------------------------------------------------------------
    def list_folder(self, prefix: str) -> dict[str, S3Object]:
        """Objects directly under ``prefix`` (a folder ending in "/"; sub-folders are not entered)."""
        out: dict[str, S3Object] = {}
        token = None
        while True:
            kw = dict(Bucket=self.bucket, Prefix=prefix, Delimiter="/")
            if token:
                kw["ContinuationToken"] = token
            resp = self._call(self.url(prefix), self.client.list_objects_v2, **kw)
            ctype = str(resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("content-type", ""))
            if ctype.startswith("text/html"):  # botocore reads an HTML page as an empty listing
                raise NotData(f"{self.url(prefix)}: the listing came back as an HTML page (Content-Type {ctype})")
            for item in resp.get("Contents", []):
                out[item["Key"]] = S3Object(item["Key"], int(item["Size"]), item["ETag"])
            token = resp.get("NextContinuationToken")
            if not resp.get("IsTruncated") or not token:
                return out

    def head(self, key: str) -> S3Object:
        resp = self._call(self.url(key), self.client.head_object, Bucket=self.bucket, Key=key)
        self._not_html(resp, key)
        return S3Object(key, int(resp["ContentLength"]), resp["ETag"])

    def _not_html(self, resp: dict, key: str) -> None:
        ctype = str(resp.get("ContentType") or "")
        if ctype.startswith("text/html") and not key.endswith((".html", ".htm")):
            raise NotData(f"{self.url(key)}: answered with an HTML page (Content-Type {ctype})")

    def remote(self, obj: S3Object) -> Remote:
        """The transfer's view of ``obj``; a multipart object gets part 1's size (one HEAD)."""
        remote = Remote(display=self.url(obj.key), key=obj.key, size=obj.size, etag=obj.etag,
                        md5=_md5_of_etag(obj.etag))
        if remote.multipart:
            resp = self._call(self.url(obj.key), self.client.head_object, Bucket=self.bucket, Key=obj.key,
                              PartNumber=1)
            remote.part_size = int(resp["ContentLength"])
            remote.parts_count = int(obj.etag.strip('"').rsplit("-", 1)[1])
            n, p = remote.parts_count, remote.part_size
            if not (n - 1) * p < obj.size <= n * p:  # parts of different sizes: ask for each (one HEAD a part)
                remote.part_sizes = self.part_sizes(remote)
        return remote

    def part_sizes(self, remote: Remote) -> list[int] | None:
        """Exact size of every part (one HEAD each) when uniform parts did not explain the ETag."""
        if not remote.multipart:
            return None
        n = int(remote.etag.strip('"').rsplit("-", 1)[1])
        return [int(self._call(self.url(remote.key), self.client.head_object, Bucket=self.bucket, Key=remote.key,
                               PartNumber=i)["ContentLength"]) for i in range(1, n + 1)]

    # -- data ----------------------------------------------------------------------------------------------
    def open_range(self, remote: Remote, start: int, end: int) -> _S3Response:
        kw = dict(Bucket=self.bucket, Key=remote.key, Range=f"bytes={start}-{end}")
        if remote.if_match and remote.etag:
            kw["IfMatch"] = remote.etag
        resp = self._call(remote.display, self.client.get_object, **kw)
        self._not_html(resp, remote.key)
        return _S3Response(resp, start)
