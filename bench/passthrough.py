"""Reference passthrough: the least a proxy hop can do (raw ASGI + one pooled client), to compare against.

Forwards POST {path} to $UPSTREAM{path} and relays the answer (SSE chunk by chunk). No routing, no checks.
PASSTHROUGH_CLIENT=aiohttp (default) or httpx picks the upstream client, so the bench compares them too.
Run: uvicorn --factory bench.passthrough:create_app --loop uvloop --http httptools
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol

import aiohttp
import httpx


class Upstream(Protocol):
    def post(
        self, url: str, body: bytes
    ) -> AbstractAsyncContextManager[tuple[int, bytes, AsyncIterator[bytes]]]: ...
    async def close(self) -> None: ...


class AiohttpUpstream:
    def __init__(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1000), auto_decompress=False
        )

    @asynccontextmanager
    async def post(self, url: str, body: bytes) -> AsyncIterator[tuple[int, bytes, AsyncIterator[bytes]]]:
        async with self.session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
            yield resp.status, resp.headers.get("content-type", "").encode(), resp.content.iter_any()

    async def close(self) -> None:
        await self.session.close()


class HttpxUpstream:
    def __init__(self) -> None:
        self.client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
        )

    @asynccontextmanager
    async def post(self, url: str, body: bytes) -> AsyncIterator[tuple[int, bytes, AsyncIterator[bytes]]]:
        request = self.client.build_request(
            "POST", url, content=body, headers={"Content-Type": "application/json"}
        )
        resp = await self.client.send(request, stream=True)
        try:
            yield resp.status_code, resp.headers.get("content-type", "").encode(), resp.aiter_raw()
        finally:
            await resp.aclose()

    async def close(self) -> None:
        await self.client.aclose()


def create_app() -> Any:
    upstream_url = os.environ["UPSTREAM"].rstrip("/")
    kind = os.environ.get("PASSTHROUGH_CLIENT", "aiohttp")
    state: dict[str, Upstream] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    state["upstream"] = HttpxUpstream() if kind == "httpx" else AiohttpUpstream()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await state["upstream"].close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        async with state["upstream"].post(upstream_url + scope["path"], body) as (
            status,
            content_type,
            chunks,
        ):
            headers = [(b"content-type", content_type or b"application/json")]
            if not content_type.startswith(b"text/event-stream"):
                data = b"".join([c async for c in chunks])
                headers.append((b"content-length", str(len(data)).encode()))
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": data, "more_body": False})
                return
            await send({"type": "http.response.start", "status": status, "headers": headers})
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app
