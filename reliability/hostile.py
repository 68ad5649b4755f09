"""Hostile input: a corpus of malformed and malicious requests against the real service over HTTP.

Every request must be answered with a 4xx status and the JSON error shape `{"error": {"code", "message"}}`,
never a 5xx, a hang or a dropped connection, and the service must be ready and searching afterwards.

    python -m reliability.hostile --model RUN/best --index BUNDLE [--out hostile.json]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import socket
import struct
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from PIL import Image

from reliability.report import print_table, write_json
from reliability.service import running_service

ADMIN_KEY = "hostile-admin-key"
JSON = {"content-type": "application/json"}


@dataclass(frozen=True)
class RawResponse:
    """The parts of a response read off a raw socket (for requests httpx would refuse to send)."""

    status_code: int
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)


Response = httpx.Response | RawResponse


@dataclass(frozen=True)
class Case:
    name: str
    send: Callable[[httpx.Client], Response]
    expect: tuple[int, ...]  # the right answers; any must be a 4xx with a JSON error


@dataclass
class Outcome:
    name: str
    status: int | None
    code: str | None
    ms: float
    ok: bool
    problem: str = ""


# -- building blocks ------------------------------------------------------------------------------------


def raw_request(base_url: str, head: bytes, body: bytes = b"", timeout_s: float = 30.0) -> RawResponse:
    """Send bytes as they are (paths with `..`, lying Content-Length) and read one response."""
    parts = urlsplit(base_url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout_s) as sock:
        sock.sendall(head + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        header_block, _, rest = data.partition(b"\r\n\r\n")
        lines = header_block.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
    return RawResponse(status, rest[:length])


def png(width: int = 32, height: int = 32, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header (IHDR, CRC fixed up) claims a huge size: no pixels are there to decode."""
    data = bytearray(png(8, 8))
    ihdr = 8 + 8  # signature, then length + type of the first chunk
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def png_bomb() -> bytes:
    """12000 x 12000 one-bit pixels: a few kilobytes that would decode to 144 M pixels."""
    return png(12000, 12000, "1")


def zip_bomb() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("zeros.bin", b"\0" * (64 * 2**20))
    return buffer.getvalue()


def bmp_claiming(width: int, height: int) -> bytes:
    header = b"BM" + struct.pack("<IHHI", 54, 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return header + info


def multipart(parts: Sequence[tuple[bytes, bytes]], boundary: bytes = b"hostileboundary") -> bytes:
    """A multipart body from (part headers, part body) pairs, exactly as given."""
    body = b""
    for headers, content in parts:
        body += b"--" + boundary + b"\r\n" + headers + b"\r\n\r\n" + content + b"\r\n"
    return body + b"--" + boundary + b"--\r\n"


def file_part(content: bytes, name: str = "file", filename: str = "q.jpg", extra: bytes = b"") -> tuple:
    headers = f'Content-Disposition: form-data; name="{name}"; filename="{filename}"'.encode()
    return (headers + extra + b"\r\nContent-Type: application/octet-stream", content)


def post_multipart(client: httpx.Client, body: bytes, boundary: bytes = b"hostileboundary") -> httpx.Response:
    content_type = b"multipart/form-data; boundary=" + boundary
    return client.post("/search/image", content=body, headers={"content-type": content_type.decode()})


def upload(client: httpx.Client, data: bytes, filename: str = "q.jpg", **form: str) -> httpx.Response:
    return client.post("/search/image", files={"file": (filename, data)}, data=form)


def text_search(client: httpx.Client, body: Any) -> httpx.Response:
    return client.post("/search/text", json=body)


def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


def chunks(total: int, size: int = 65536) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        yield b" " * min(size, total - sent)
        sent += size


# -- the corpus -----------------------------------------------------------------------------------------


def corpus(base_url: str, photo: bytes) -> list[Case]:
    """At least 40 requests that must each be refused with a 4xx and a JSON error."""

    def raw(head: str, body: bytes = b"") -> Callable[[httpx.Client], Response]:
        return lambda client: raw_request(base_url, head.encode(), body)

    big_query = {"query": "x" * 2001}
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"><script>alert(1)</script></svg>'
    laughs = (
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
        b'<!ENTITY xxe SYSTEM "file:///etc/passwd">]><lolz>&lol2;&xxe;</lolz>'
    )
    cases = [
        # JSON bodies
        Case(
            "truncated JSON", lambda c: c.post("/search/text", content=b'{"query": "x"', headers=JSON), (400,)
        ),
        Case("empty JSON body", lambda c: c.post("/search/text", content=b"", headers=JSON), (400, 422)),
        Case("JSON array body", lambda c: text_search(c, ["black dress"]), (422,)),
        Case("JSON string body", lambda c: text_search(c, "black dress"), (422,)),
        Case("JSON null body", lambda c: c.post("/search/text", content=b"null", headers=JSON), (422,)),
        Case(
            "huge JSON (1 MiB, declared)",
            lambda c: text_search(c, {"query": "x", "pad": "y" * 2**20}),
            (413,),
        ),
        Case(
            "huge JSON (4 MiB, chunked, no length)",
            lambda c: c.post("/search/text", content=chunks(4 * 2**20), headers=JSON),
            (413,),
        ),
        Case(
            "deeply nested arrays (20k levels)",
            lambda c: c.post("/search/text", content=nested(20000).encode(), headers=JSON),
            (400, 422),
        ),
        Case(
            "deeply nested objects in filters (5k levels)",
            lambda c: c.post(
                "/search/text",
                content=('{"query":"x","filters":' + '{"a":' * 5000 + "1" + "}" * 5001).encode(),
                headers=JSON,
            ),
            (400, 422),
        ),
        Case(
            "invalid UTF-8 in JSON",
            lambda c: c.post("/search/text", content=b'{"query": "\xff\xfe\xc0\xaf"}', headers=JSON),
            (400, 422),
        ),
        Case(
            "raw NUL byte inside a JSON string",
            lambda c: c.post("/search/text", content=b'{"query": "a\x00b"}', headers=JSON),
            (400, 422),
        ),
        Case("escaped NUL in the query", lambda c: text_search(c, {"query": "dress\u0000"}), (422,)),
        Case(
            "control characters in the query", lambda c: text_search(c, {"query": "a\u0007\u001b[2J"}), (422,)
        ),
        Case(
            "unpaired surrogate in the query",
            lambda c: c.post("/search/text", content=b'{"query": "\\ud800 dress"}', headers=JSON),
            (400, 422),
        ),
        Case(
            "NaN in JSON",
            lambda c: c.post("/search/text", content=b'{"query":"x","k":NaN}', headers=JSON),
            (400, 422),
        ),
        Case("query over the length limit", lambda c: text_search(c, big_query), (422,)),
        Case("blank query", lambda c: text_search(c, {"query": " \t\n "}), (422,)),
        Case("missing query", lambda c: text_search(c, {"k": 5}), (422,)),
        Case("query as an object", lambda c: text_search(c, {"query": {"$ne": ""}}), (422,)),
        Case("query as a number", lambda c: text_search(c, {"query": 12}), (422,)),
        Case("negative k", lambda c: text_search(c, {"query": "x", "k": -1}), (422,)),
        Case("k of 10^40", lambda c: text_search(c, {"query": "x", "k": 10**40}), (422,)),
        Case("fractional k", lambda c: text_search(c, {"query": "x", "k": 1.5}), (422,)),
        Case("offset past the maximum", lambda c: text_search(c, {"query": "x", "offset": 10**6}), (422,)),
        Case(
            "recall_k past the maximum", lambda c: text_search(c, {"query": "x", "recall_k": 10**9}), (422,)
        ),
        Case(
            "unknown field (__proto__)",
            lambda c: text_search(c, {"query": "x", "__proto__": {"a": 1}}),
            (422,),
        ),
        Case("unknown filter", lambda c: text_search(c, {"query": "x", "filters": {"price": "1"}}), (422,)),
        Case(
            "SQL in a filter name",
            lambda c: text_search(c, {"query": "x", "filters": {"metadata.x'); DROP TABLE items;--": "1"}}),
            (422,),
        ),
        Case(
            "filter value as an object",
            lambda c: text_search(c, {"query": "x", "filters": {"category": {}}}),
            (422,),
        ),
        Case(
            "text/plain body",
            lambda c: c.post("/search/text", content=b"black dress", headers={"content-type": "text/plain"}),
            (415,),
        ),
        Case("no content type", lambda c: c.post("/search/text", content=b'{"query":"x"}'), (415,)),
        Case("form body to the JSON route", lambda c: c.post("/search/text", data={"query": "x"}), (415,)),
        # uploads
        Case("no file field", lambda c: c.post("/search/image", data={"k": "3"}), (415, 422)),
        Case("empty file", lambda c: upload(c, b""), (422,)),
        Case("plain text file", lambda c: upload(c, b"hello, not an image", "q.txt"), (415,)),
        Case("truncated JPEG", lambda c: upload(c, photo[: len(photo) // 3]), (422,)),
        Case("JPEG header only", lambda c: upload(c, b"\xff\xd8\xff\xe0 truncated"), (422,)),
        Case("PNG bomb (144 M pixels)", lambda c: upload(c, png_bomb(), "bomb.png"), (413,)),
        Case(
            "PNG header claiming 100k x 100k",
            lambda c: upload(c, png_claiming(100_000, 100_000), "big.png"),
            (413,),
        ),
        Case(
            "BMP header claiming 60k x 60k",
            lambda c: upload(c, bmp_claiming(60_000, 60_000), "big.bmp"),
            (413, 422),
        ),
        Case("zip bomb (64 MiB of zeros)", lambda c: upload(c, zip_bomb(), "q.zip"), (415,)),
        Case("SVG with script", lambda c: upload(c, svg, "q.svg"), (415,)),
        Case("XML with entity expansion and XXE", lambda c: upload(c, laughs, "q.xml"), (415,)),
        Case("PDF", lambda c: upload(c, b"%PDF-1.7\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", "q.pdf"), (415,)),
        Case(
            "GIF/JavaScript polyglot",
            lambda c: upload(c, b"GIF89a/*\x00\x00*/=1;alert(document.domain)//", "q.gif"),
            (415, 422),
        ),
        Case(
            "HTML disguised as JPEG",
            lambda c: upload(c, b"<html><script>alert(1)</script></html>", "q.jpg"),
            (415,),
        ),
        Case(
            "upload over the byte limit (11 MiB)", lambda c: upload(c, photo + b"\0" * (11 * 2**20)), (413,)
        ),
        Case("non-numeric k in the form", lambda c: upload(c, photo, k="ten"), (422,)),
        Case("filters form field not JSON", lambda c: upload(c, photo, filters="{category: Shoes"), (422,)),
        Case(
            "multipart without a boundary",
            lambda c: c.post(
                "/search/image", content=b"--x\r\n\r\n", headers={"content-type": "multipart/form-data"}
            ),
            (400, 422),
        ),
        Case("multipart garbage", lambda c: post_multipart(c, b"\x00\xff" * 4096), (400, 422)),
        Case(
            "over-long multipart part header (256 KiB)",
            lambda c: post_multipart(c, multipart([file_part(photo, extra=b"\r\nX-Pad: " + b"a" * 2**18)])),
            (400, 413, 422),
        ),
        Case(
            "2,000 files in one request",
            lambda c: post_multipart(
                c, multipart([file_part(b"x", filename=f"{i}.jpg") for i in range(2000)])
            ),
            (400, 413, 422),
        ),
        Case(
            "2,000 form fields",
            lambda c: post_multipart(
                c,
                multipart(
                    [(f'Content-Disposition: form-data; name="f{i}"'.encode(), b"1") for i in range(2000)]
                    + [file_part(photo)]
                ),
            ),
            (400, 413, 422),
        ),
        Case(
            "gzip-encoded multipart body",
            lambda c: c.post(
                "/search/image",
                content=gzip.compress(multipart([file_part(photo)])),
                headers={
                    "content-type": "multipart/form-data; boundary=hostileboundary",
                    "content-encoding": "gzip",
                },
            ),
            (400, 415, 422),
        ),
        Case(
            "lying Content-Length (1 TB declared)",
            raw(
                f"POST /search/image HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: {10**12}\r\n"
            ),
            (413,),
        ),
        # paths and ids
        Case(
            "item id with encoded ../ traversal",
            lambda c: c.get("/items/..%2F..%2F..%2Fetc%2Fpasswd/image"),
            (404,),
        ),
        Case(
            "item id with literal ../ traversal",
            raw("GET /items/../../../../etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"),
            (404,),
        ),
        Case("item id with a NUL byte", lambda c: c.get("/items/%00/image"), (404,)),
        Case("item id that is an absolute path", lambda c: c.get("/items/%2Fetc%2Fpasswd"), (404,)),
        Case("item id of 4,000 characters", lambda c: c.get("/items/" + "9" * 4000), (404,)),
        Case("static file traversal", lambda c: c.get("/static/..%2F..%2Fmain.py"), (404,)),
        Case("static file outside the list", lambda c: c.get("/static/index.html%00.js"), (404,)),
        Case("unknown route", lambda c: c.get("/.env"), (404,)),
        Case("wrong method on search", lambda c: c.get("/search/text"), (405,)),
        # admin
        Case("reload without an API key", lambda c: c.post("/admin/reload"), (401,)),
        Case(
            "reload with a wrong API key",
            lambda c: c.post("/admin/reload", headers={"X-API-Key": "guess"}),
            (403,),
        ),
        Case(
            "reload with a key prefix",
            lambda c: c.post("/admin/reload", headers={"X-API-Key": ADMIN_KEY[:-1]}),
            (403,),
        ),
        Case(
            "reload with an 8 KiB key",
            lambda c: c.post("/admin/reload", headers={"X-API-Key": "k" * 8192}),
            (403,),
        ),
        Case(
            "reload pointed at /etc",
            lambda c: c.post("/admin/reload", json={"index": "/etc"}, headers={"X-API-Key": ADMIN_KEY}),
            (403, 422),
        ),
        Case(
            "reload pointed at a traversal path",
            lambda c: c.post(
                "/admin/reload",
                json={"index": "../../../../../../proc/self"},
                headers={"X-API-Key": ADMIN_KEY},
            ),
            (403, 422),
        ),
    ]
    return cases


# -- the run --------------------------------------------------------------------------------------------


def judge(case: Case, response: Response, ms: float) -> Outcome:
    status = response.status_code
    try:
        body = response.json()
        code = body["error"]["code"]
        assert isinstance(code, str) and isinstance(body["error"]["message"], str)
    except (ValueError, KeyError, TypeError, AssertionError):
        return Outcome(case.name, status, None, ms, False, "not a JSON error")
    if not 400 <= status < 500:
        return Outcome(case.name, status, code, ms, False, f"{status} is not a 4xx")
    if status not in case.expect:
        return Outcome(case.name, status, code, ms, False, f"expected {case.expect}")
    return Outcome(case.name, status, code, ms, True)


def run_corpus(base_url: str, photo: bytes, timeout_s: float = 60.0) -> list[Outcome]:
    outcomes = []
    with httpx.Client(base_url=base_url, timeout=timeout_s) as client:
        for case in corpus(base_url, photo):
            start = time.perf_counter()
            try:
                response = case.send(client)
            except (httpx.HTTPError, OSError, ValueError, IndexError) as error:
                ms = 1000 * (time.perf_counter() - start)
                outcomes.append(Outcome(case.name, None, None, ms, False, f"no answer: {error!r}"))
                continue
            outcomes.append(judge(case, response, 1000 * (time.perf_counter() - start)))
    return outcomes


def healthy_after(base_url: str, query: str, photo: bytes) -> bool:
    """Ready, and a normal text and image search still answer 200."""
    with httpx.Client(base_url=base_url, timeout=60) as client:
        return (
            client.get("/readyz").status_code == 200
            and client.post("/search/text", json={"query": query}).status_code == 200
            and upload(client, photo).status_code == 200
        )


def sample_query(index: Path) -> tuple[str, bytes]:
    """A real item's text and photo from the bundle, for the healthy-afterwards searches."""
    from index.bundle import Bundle

    with Bundle.open(index, verify_checksums=False) as bundle:
        item = bundle.items([0])[0]
    return item["text"], Path(item["image"]).read_bytes()


def run(model: Path, index: Path, workdir: Path) -> dict[str, Any]:
    query, photo = sample_query(index)
    settings = {"admin_api_key": ADMIN_KEY}
    with running_service(model, index, workdir / "hostile.server.log", settings) as service:
        start = time.perf_counter()
        outcomes = run_corpus(service.base_url, photo)
        seconds = time.perf_counter() - start
        healthy = healthy_after(service.base_url, query, photo)
        log = service.log()
    return {
        "inputs": len(outcomes),
        "answered_correctly": sum(o.ok for o in outcomes),
        "server_errors": sum(o.status is not None and o.status >= 500 for o in outcomes),
        "unanswered": sum(o.status is None for o in outcomes),
        "healthy_after": healthy,
        "tracebacks_in_log": log.count("Traceback"),
        "seconds": seconds,
        "max_ms": max(o.ms for o in outcomes),
        "outcomes": [o.__dict__ for o in outcomes],
    }


def print_result(result: dict[str, Any]) -> None:
    for outcome in result["outcomes"]:
        mark = "ok " if outcome["ok"] else "BAD"
        print(
            f"{mark} {outcome['status']} {outcome['code'] or '-':24} {outcome['ms']:8.1f} ms  {outcome['name']} {outcome['problem']}"
        )
    print_table(
        "Hostile input",
        [
            ("malformed requests sent", result["inputs"]),
            ("answered 4xx with the expected JSON error", result["answered_correctly"]),
            ("5xx answers", result["server_errors"]),
            ("unanswered (dropped, timed out)", result["unanswered"]),
            ("slowest answer, ms", result["max_ms"]),
            ("tracebacks in the server log", result["tracebacks_in_log"]),
            ("ready and searching afterwards", "yes" if result["healthy_after"] else "NO"),
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="checkpoint folder")
    parser.add_argument("--index", type=Path, required=True, help="bundle built for that checkpoint")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hostile-") as workdir:
        result = run(args.model, args.index, Path(workdir))
    print_result(result)
    write_json(args.out, result)
    ok = result["answered_correctly"] == result["inputs"] and result["healthy_after"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
