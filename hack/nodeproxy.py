#!/usr/bin/env python3
"""The apiserver's way to the kubelets of hack/node.sh's nodes (kubectl logs/exec/port-forward).

The nodes live in network namespaces that the host namespace has no route to (no address is ever
added to the host's interfaces). kube-apiserver's egress selector sends its node-bound traffic as
HTTP CONNECT over a unix socket to this proxy; a CONNECT to <node ip>:<port> is spliced onto
`<nodes dir>/ports/<node ip>-<port>.sock`, which a socat inside that node's namespace forwards to
the kubelet. A CONNECT to anything else is refused (502), so the apiserver reaches nothing more.

    nodeproxy.py <listen socket> <nodes dir>
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from pathlib import Path

CONNECT = re.compile(rb"^CONNECT (\d{1,3}(?:\.\d{1,3}){3}):(\d{1,5}) HTTP/1\.[01]\r\n")


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ports: Path) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        writer.close()
        return
    match = CONNECT.match(head)
    target = ports / f"{match.group(1).decode()}-{match.group(2).decode()}.sock" if match else None
    if target is None or not target.exists():
        writer.write(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
        writer.close()
        return
    try:
        up_reader, up_writer = await asyncio.open_unix_connection(str(target))
    except OSError:
        writer.write(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
        writer.close()
        return
    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def main(listen: str, nodes_dir: str) -> None:
    ports = Path(nodes_dir) / "ports"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(listen)
    server = await asyncio.start_unix_server(lambda r, w: _handle(r, w, ports), path=listen)
    os.chmod(listen, 0o600)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    asyncio.run(main(sys.argv[1], sys.argv[2]))
