"""Loopback servers for the download tests: moto S3 holding an NSD-format tree, a fault-injecting proxy, a
Range-capable static HTTP server that also plays the Hugging Face hub (tree + resolve routes).

Everything binds 127.0.0.1 on a free port and runs in daemon threads.
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import os
import re
import socket
import threading
import time
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

os.environ["S3_UPLOAD_PART_MIN_SIZE"] = "256"  # before moto is imported: small multipart fixtures

BUCKET = "natural-scenes-dataset"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def _serve(handler_cls) -> tuple[_Server, str]:
    server = _Server(("127.0.0.1", 0), handler_cls)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


# ------------------------------------------------------------------------------------------------ moto S3
def start_moto():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def admin_client(endpoint: str):
    import boto3
    from botocore.config import Config

    # NSD's objects are legacy uploads without CRC checksums: don't add them
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-2", aws_access_key_id="test",
                        aws_secret_access_key="test", config=Config(request_checksum_calculation="when_required"))


def create_public_bucket(client, denied_keys=()) -> None:
    client.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "us-east-2"})
    statements = [{"Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:HeadObject", "s3:ListBucket"],
                   "Resource": [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"]}]
    if denied_keys:
        statements.append({"Effect": "Deny", "Principal": "*", "Action": ["s3:GetObject"],
                           "Resource": [f"arn:aws:s3:::{BUCKET}/{k}" for k in denied_keys]})
    client.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps({"Version": "2012-10-17", "Statement": statements}))


def upload(client, key: str, data: bytes, parts: list[int] | None = None) -> str:
    """Upload ``data`` as one object, or multipart with part sizes ``parts`` (the last takes the rest)."""
    if not parts:
        return client.put_object(Bucket=BUCKET, Key=key, Body=data)["ETag"]
    up = client.create_multipart_upload(Bucket=BUCKET, Key=key)
    done, pos = [], 0
    sizes = list(parts) + [len(data) - sum(parts)]
    for n, size in enumerate(s for s in sizes if s > 0):
        r = client.upload_part(Bucket=BUCKET, Key=key, UploadId=up["UploadId"], PartNumber=n + 1,
                               Body=data[pos: pos + size])
        done.append({"ETag": r["ETag"], "PartNumber": n + 1})
        pos += size
    return client.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=up["UploadId"],
                                            MultipartUpload={"Parts": done})["ETag"]


def uniform_parts(size: int, part: int) -> list[int]:
    return [part] * ((size - 1) // part)


@dataclass
class Fault:
    kind: str  # drop | flip | status | ignore_range | html | hang
    match: str  # substring of the request path
    n: int = 0  # drop/hang: body bytes sent first; flip: body offset; status: the code
    times: int = 1  # requests affected (-1: all)
    method: str = "GET"


@dataclass
class FaultProxy:
    upstream: str
    url: str = ""
    faults: list = field(default_factory=list)
    log: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, match: str, n: int = 0, times: int = 1, method: str = "GET") -> None:
        with self.lock:
            self.faults.append(Fault(kind, match, n, times, method))

    def reset(self) -> None:
        with self.lock:
            self.faults.clear()
            self.log.clear()

    def _take(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.method == method and f.match in path and f.times != 0:
                    f.times -= 1
                    return f
        return None

    def sent(self, match: str = "", method: str = "GET") -> int:
        """Body bytes sent for requests whose path contains ``match`` (listings excluded)."""
        with self.lock:
            return sum(e["sent"] for e in self.log if e["method"] == method and match in e["path"]
                       and "list-type" not in e["path"])

    def requests(self, match: str = "", method: str | None = None) -> list[dict]:
        with self.lock:
            return [e for e in self.log if match in e["path"] and (method is None or e["method"] == method)]


def start_proxy(upstream: str) -> tuple[FaultProxy, _Server]:
    proxy = FaultProxy(upstream)
    up = re.match(r"http://([^:/]+):(\d+)", upstream)
    up_host, up_port = up.group(1), int(up.group(2))

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _forward(self, headers: dict):
            conn = http.client.HTTPConnection(up_host, up_port, timeout=30)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
            return resp.status, resp.getheaders(), data

        def _handle(self):
            fault = proxy._take(self.command, self.path)
            headers = {k: v for k, v in self.headers.items()}
            entry = {"method": self.command, "path": self.path, "range": headers.get("Range"), "sent": 0,
                     "fault": fault.kind if fault else None}
            with proxy.lock:
                proxy.log.append(entry)
            if fault and fault.kind == "ignore_range":
                headers.pop("Range", None)
            if fault and fault.kind == "status":
                code = {403: "AccessDenied", 503: "ServiceUnavailable"}.get(fault.n, "Error")
                data = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
                status, out_headers = fault.n, [("Content-Type", "application/xml")]
            elif fault and fault.kind == "html":
                data = b"<!DOCTYPE html><html><body>Please log in to the network</body></html>"
                status, out_headers = 200, [("Content-Type", "text/html; charset=utf-8")]
            else:
                status, out_headers, data = self._forward(headers)
            if fault and fault.kind == "flip" and fault.n < len(data):
                data = bytearray(data)
                data[fault.n] ^= 0xFF
                data = bytes(data)
            self.send_response(status)
            for k, v in out_headers:
                if k.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                    self.send_header(k, v)
            if self.command == "HEAD":
                cl = dict((k.lower(), v) for k, v in out_headers).get("content-length", "0")
                self.send_header("Content-Length", cl)
                self.end_headers()
                return
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if fault and fault.kind in ("drop", "hang"):
                self.wfile.write(data[: fault.n])
                self.wfile.flush()
                entry["sent"] = min(fault.n, len(data))
                if fault.kind == "hang":
                    time.sleep(30)
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            self.wfile.write(data)
            entry["sent"] = len(data)

        do_GET = do_HEAD = do_PUT = do_POST = _handle

    server, proxy.url = _serve(Handler)
    return proxy, server


# ------------------------------------------------------------------------------------------------ static + hub
@dataclass
class StaticSite:
    """Files by URL path; ``content_md5`` paths also send Content-MD5; ``json_routes`` answer JSON."""

    files: dict = field(default_factory=dict)
    content_md5: set = field(default_factory=set)
    json_routes: dict = field(default_factory=dict)
    url: str = ""


def start_static(site: StaticSite):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _handle(self):
            path = self.path.split("?")[0]
            for prefix, obj in site.json_routes.items():
                if path.rstrip("/") == prefix.rstrip("/"):
                    data = json.dumps(obj).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command == "GET":
                        self.wfile.write(data)
                    return
            data = site.files.get(path)
            if data is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            etag = '"' + hashlib.sha1(data).hexdigest()[:16] + '"'  # opaque, like Azure's
            start, end, status = 0, len(data) - 1, 200
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
            if m:
                start = int(m.group(1))
                end = min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
                status = 206
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            if self.headers.get("If-Match") and self.headers["If-Match"] != etag:
                self.send_response(412)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = data[start: end + 1]
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", etag)
            if path in site.content_md5:
                self.send_header("Content-MD5", base64.b64encode(hashlib.md5(data).digest()).decode())
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.send_header("Content-Length", str(len(body) if self.command == "GET" else len(data)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body)

        do_GET = do_HEAD = _handle

    server, site.url = _serve(Handler)
    return server


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def hub_tree(repo_files: dict[str, bytes], lfs_suffixes=(".bin", ".safetensors", ".th", ".ckpt", ".pth")) -> list:
    """The hub's recursive tree listing of ``repo_files`` (LFS entries carry sha256 as ``lfs.oid``)."""
    out, dirs = [], set()
    for path, data in sorted(repo_files.items()):
        parts = path.split("/")
        for k in range(1, len(parts)):
            dirs.add("/".join(parts[:k]))
        entry = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
        if path.endswith(lfs_suffixes):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        out.append(entry)
    return [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(dirs)] + out


def coco_zip(annotations_dir: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for split in ("train2017", "val2017"):
            z.write(annotations_dir / f"captions_{split}.json", f"annotations/captions_{split}.json")
    return buf.getvalue()
