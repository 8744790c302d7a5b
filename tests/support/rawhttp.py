"""Raw HTTP clients for hostile-input tests and benches: connections that never send a
byte, requests read only up to their head, and values read off `/metrics`. Loopback only."""

from __future__ import annotations

import asyncio
import re

import aiohttp

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_idle(port: int, count: int, *, batch: int = 100) -> list[Connection]:
    """`count` connections to 127.0.0.1:`port` that never send a byte (opened `batch`
    at a time, each within 5 s)."""
    connections: list[Connection] = []
    for first in range(0, count, batch):
        opening = [
            asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5) for _ in range(min(batch, count - first))
        ]
        connections.extend(await asyncio.gather(*opening))
    return connections


def closed_by_peer(connection: Connection) -> bool:
    reader, _ = connection
    return reader.at_eof() or reader.exception() is not None


def close_all(connections: list[Connection]) -> None:
    """Drop every connection at once, without a goodbye."""
    for _, writer in connections:
        writer.transport.abort()


async def request_head(port: int, path: str) -> tuple[int, dict[str, str], Connection]:
    """GET `path` and read the response up to the end of its head: (status, headers with
    lower-case names, the connection, its body unread)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode()
    status_line, *lines = head.strip().split("\r\n")
    headers = {name.lower(): value for name, _, value in (line.partition(": ") for line in lines)}
    return int(status_line.split()[1]), headers, (reader, writer)


def metric(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    if match is None:
        raise AssertionError(f"{name}{labels} not in /metrics")
    return float(match.group(1))


async def scrape(port: int) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as response:
        return await response.text()
