"""Reference passthrough: the least a proxy hop can do (raw ASGI + one aiohttp pool), to compare against.

Forwards POST {path} to $UPSTREAM{path} and relays the answer chunk by chunk. No routing, no checks.
Run: uvicorn --factory bench.passthrough:create_app --loop uvloop --http httptools
"""

from __future__ import annotations

import os
from typing import Any

import aiohttp


def create_app() -> Any:
    upstream = os.environ["UPSTREAM"].rstrip("/")
    state: dict[str, aiohttp.ClientSession] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    state["session"] = aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(limit=1000), auto_decompress=False
                    )
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await state["session"].close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        async with state["session"].post(
            upstream + scope["path"], data=body, headers={"Content-Type": "application/json"}
        ) as resp:
            content_type = resp.headers.get("content-type", "application/json").encode()
            headers = [(b"content-type", content_type)]
            if not content_type.startswith(b"text/event-stream"):
                data = await resp.read()
                headers.append((b"content-length", str(len(data)).encode()))
                await send({"type": "http.response.start", "status": resp.status, "headers": headers})
                await send({"type": "http.response.body", "body": data, "more_body": False})
                return
            await send({"type": "http.response.start", "status": resp.status, "headers": headers})
            async for chunk in resp.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app
