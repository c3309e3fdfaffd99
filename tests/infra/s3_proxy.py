"""A tiny HTTP proxy on 127.0.0.1 in front of the tests' moto server, misbehaving on purpose.

It forwards every request unchanged (the Host header too, so SigV4 signatures still verify)
and lets a test change what some answers look like, as servers in the wild do:

- ``ignore_if_none_match``: a PUT with ``If-None-Match: *`` on an existing key overwrites it and
  answers 200, like S3-compatible servers that ignore the header;
- ``bare_412``: a 412 answer loses its ``<Condition>`` element (s3fs then raises OSError(EINVAL)
  instead of FileExistsError);
- ``not_implemented``: a PUT with ``If-None-Match`` is answered 501 NotImplemented;
- ``unavailable``: GETs of keys ending with one of these suffixes are answered 503 SlowDown.

``requests`` counts what it saw per (method, conditional?) so tests can show there were no retries.
"""

from __future__ import annotations

import http.client
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


def error_xml(code: str, message: str, condition: str | None = None) -> bytes:
    extra = f"<Condition>{condition}</Condition>" if condition else ""
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
        f"{extra}<RequestId>proxy</RequestId></Error>"
    ).encode()


def decode_aws_chunked(body: bytes) -> bytes:
    """The payload of an ``aws-chunked`` body (``hex-size;chunk-signature=...\\r\\n data \\r\\n ... 0``)."""
    out, rest = bytearray(), body
    while rest:
        header, _, rest = rest.partition(b"\r\n")
        size = int(header.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        rest = rest[size + 2 :]
    return bytes(out)


@dataclass
class S3Proxy:
    upstream: str  # http://127.0.0.1:PORT of the real server
    client: object  # a boto3 S3 client on the real server (for the overwrite an ignoring server does)
    ignore_if_none_match: bool = False
    bare_412: bool = False
    not_implemented: bool = False
    unavailable: tuple[str, ...] = ()
    requests: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return bytes(data)
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                head = self.command == "HEAD"  # its Content-Length is the object's, with no body
                for name, value in headers:
                    if name.lower() not in HOP_BY_HOP and (head or name.lower() != "content-length"):
                        self.send_header(name, value)
                if not head:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self) -> None:
                body = self._body()
                conditional = "If-None-Match" in self.headers
                proxy.requests[(self.command, conditional)] += 1
                path = urlparse(self.path).path
                if proxy.not_implemented and self.command == "PUT" and conditional:
                    return self._answer(
                        501,
                        [("Content-Type", "application/xml")],
                        error_xml(
                            "NotImplemented", "A header you provided implies functionality that is not implemented"
                        ),
                    )
                if self.command == "GET" and any(path.endswith(suffix) for suffix in proxy.unavailable):
                    return self._answer(
                        503,
                        [("Content-Type", "application/xml")],
                        error_xml("SlowDown", "Please reduce your request rate."),
                    )
                status, headers, answer = proxy.forward(self.command, self.path, list(self.headers.items()), body)
                if status == 412 and self.command == "PUT" and conditional and proxy.ignore_if_none_match:
                    bucket, _, key = unquote(path).lstrip("/").partition("/")
                    payload = (
                        decode_aws_chunked(body) if "aws-chunked" in self.headers.get("Content-Encoding", "") else body
                    )
                    put = proxy.client.put_object(Bucket=bucket, Key=key, Body=payload)
                    return self._answer(200, [("ETag", put["ETag"])], b"")
                if status == 412 and proxy.bare_412:
                    answer = re.sub(rb"<Condition>.*?</Condition>", b"", answer)
                self._answer(status, headers, answer)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def forward(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes):
        target = urlparse(self.upstream)
        connection = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
        try:
            connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                    connection.putheader(name, value)
            connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
