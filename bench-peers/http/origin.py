#!/usr/bin/env python3
"""A scripted HTTP/1.1 origin for bench-peers/http/run.sh (127.0.0.1 only, stdlib only).

Routes (every path may carry a unique suffix: the first segment picks the route):
  /fast/NAME?size=N            N bytes at once, Content-Length, max-age=3600, ETag
  /slow/NAME?size=N&secs=S     N bytes spread over S seconds (Content-Length)
  /die/NAME?size=N&secs=S      announces N bytes, sends half over S/2 seconds, then closes
  /sem/nostore/...             Cache-Control: no-store
  /sem/private/...             Cache-Control: private, max-age=60
  /sem/cookie/...              max-age=60 and Set-Cookie: n=<request number>
  /sem/auth/...                max-age=60 (the body says whether Authorization arrived)
  /sem/maxage2/...             max-age=2
  /sem/etag/...                max-age=60, ETag "v1" (304 to a matching If-None-Match)
  /sem/vary/...                max-age=60, Vary: X-Lang (the body is the X-Lang value)
  /__count?p=PREFIX            how many requests had a path starting with PREFIX
Every body is the same deterministic byte pattern (or a short text for /sem/).
"""

import asyncio
import sys
import time
from urllib.parse import parse_qs, urlsplit

BLOCK = bytes((i * 7 + 3) % 251 for i in range(1 << 20))
COUNTS = {}


def pattern(n):
    """n bytes of the pattern, as memoryview slices of the 1 MiB block."""
    out = []
    while n > 0:
        take = min(n, len(BLOCK))
        out.append(memoryview(BLOCK)[:take])
        n -= take
    return out


async def send_body(writer, size, secs, stop_at=None):
    sent, start = 0, time.monotonic()
    step = 64 << 10
    while sent < size:
        if stop_at is not None and sent >= stop_at:
            writer.transport.abort()  # the origin dies mid-body
            return False
        n = min(step, size - sent)
        off = sent % len(BLOCK)
        if off + n <= len(BLOCK):
            writer.write(memoryview(BLOCK)[off:off + n])
        else:
            writer.write(BLOCK[off:] + BLOCK[:n - (len(BLOCK) - off)])
        sent += n
        await writer.drain()
        if secs > 0:
            due = start + secs * sent / size
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
    return True


def head(status, headers, length):
    lines = [f"HTTP/1.1 {status}"]
    lines += [f"{k}: {v}" for k, v in headers]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def handle(reader, writer):
    try:
        while True:
            raw = await reader.readuntil(b"\r\n\r\n")
            lines = raw.decode("latin-1").split("\r\n")
            method, target, version = lines[0].split(" ", 2)
            hdrs = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    hdrs[k.strip().lower()] = v.strip()
            clen = int(hdrs.get("content-length", "0") or 0)
            if clen:
                await reader.readexactly(clen)
            url = urlsplit(target)
            path, q = url.path, parse_qs(url.query)
            if path != "/__count":
                COUNTS[path] = COUNTS.get(path, 0) + 1
            nth = COUNTS.get(path, 0)
            keep = version == "HTTP/1.1" and hdrs.get("connection", "").lower() != "close"
            conn = [("Connection", "keep-alive" if keep else "close")]
            route = path.split("/")[1] if path.count("/") >= 1 else ""
            size = int(q.get("size", ["1048576"])[0])
            secs = float(q.get("secs", ["0"])[0])
            is_head = method == "HEAD"
            if method not in ("GET", "HEAD", "POST"):
                writer.write(head("405 Method Not Allowed", conn + [("Allow", "GET, HEAD, POST")], 0))
            elif path == "/__count":
                prefix = q.get("p", [""])[0]
                n = sum(c for p, c in COUNTS.items() if p.startswith(prefix))
                body = str(n).encode()
                writer.write(head("200 OK", conn, len(body)) + body)
            elif route in ("fast", "slow", "die"):
                hs = conn + [("Cache-Control", "max-age=3600"), ("ETag", '"b1"'),
                             ("Content-Type", "application/octet-stream")]
                writer.write(head("200 OK", hs, size))
                if not is_head:
                    stop = size // 2 if route == "die" else None
                    ok = await send_body(writer, size, secs if route != "fast" else 0, stop)
                    if not ok:
                        return
            elif route == "sem":
                case = path.split("/")[2] if path.count("/") >= 2 else ""
                hs = conn + [("Content-Type", "text/plain")]
                status, body = "200 OK", f"{case} #{nth}"
                if case == "nostore":
                    hs.append(("Cache-Control", "no-store"))
                elif case == "private":
                    hs.append(("Cache-Control", "private, max-age=60"))
                elif case == "cookie":
                    hs += [("Cache-Control", "max-age=60"), ("Set-Cookie", f"n={nth}")]
                elif case == "auth":
                    hs.append(("Cache-Control", "max-age=60"))
                    body += " auth=" + ("yes" if "authorization" in hdrs else "no")
                elif case == "maxage2":
                    hs.append(("Cache-Control", "max-age=2"))
                elif case == "etag":
                    hs += [("Cache-Control", "max-age=60"), ("ETag", '"v1"')]
                    if hdrs.get("if-none-match") == '"v1"':
                        status, body = "304 Not Modified", ""
                elif case == "vary":
                    hs += [("Cache-Control", "max-age=60"), ("Vary", "X-Lang")]
                    body = f"lang={hdrs.get('x-lang', 'none')} #{nth}"
                else:
                    hs.append(("Cache-Control", "max-age=60"))
                data = body.encode()
                if status.startswith("304"):
                    writer.write(head(status, hs, None))
                else:
                    writer.write(head(status, hs, len(data)) + (b"" if is_head else data))
            else:
                writer.write(head("404 Not Found", conn, 0))
            await writer.drain()
            if not keep:
                break
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def main():
    port = int(sys.argv[1])
    server = await asyncio.start_server(handle, "127.0.0.1", port, limit=1 << 16)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
