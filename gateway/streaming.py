"""SSE relay: forwards whole events as they arrive; a failure mid-stream becomes an SSE error event."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp

from gateway.asgi import Reply
from gateway.errors import GatewayError

# An upstream that never ends an event must not make the gateway hold its output without bound.
MAX_PENDING = 1024 * 1024


def event_end(data: bytes) -> int:
    """Index just past the last complete SSE event in data (0 when none is complete)."""
    lf = data.rfind(b"\n\n")
    crlf = data.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


async def relay(
    resp: aiohttp.ClientResponse,
    reply: Reply,
    first: bytes,
    on_failure: Callable[[BaseException], GatewayError],
) -> GatewayError | None:
    """Send first and every later chunk, cut at event boundaries so an error event never splits one.

    Returns the failure that ended the stream early (already sent to the client), or None.
    """
    pending = b""
    data = first
    try:
        while data:
            pending = pending + data if pending else data
            cut = event_end(pending)
            if cut == len(pending) or len(pending) > MAX_PENDING:
                await reply.chunk(pending)
                pending = b""
            elif cut:
                await reply.chunk(pending[:cut])
                pending = pending[cut:]
            data = await resp.content.readany()
    except (aiohttp.ClientError, TimeoutError) as exc:
        error = on_failure(exc)
        await reply.error(error)
        return error
    if pending:
        await reply.chunk(pending)
    return None
