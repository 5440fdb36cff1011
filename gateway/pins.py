"""State a server keeps stays with that server: a Responses API request that continues a response
(`previous_response_id`) or a conversation (`conversation`) goes to the arm whose server holds it, whatever
the route's weight says now, and is never mirrored to the other arm.

The gateway remembers response id -> (route, arm, server) as each Responses answer leaves, and conversation
id -> the same on a conversation's first answer. Records live where feedback's do (the record store: in
memory, or shared through Redis by every replica; bounded, for CANARYGATE_FEEDBACK_TTL_S). The server is a
digest of the arm's url: after a promotion the record still finds the arm now served by that server, and
after a rollback the request fails clearly instead of reaching a server that never heard of the response.
Writes leave at once (not batched with feedback's): the next step of an agent may come to another replica
within milliseconds. A lookup that finds nothing asks again for a moment, for a write still on its way.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.errors import InvalidRequest, Unavailable
from gateway.fields import wrong_type
from gateway.route import Route, RouteArm
from gateway.store import StateUnavailable
from gateway.store.records import RecordStore, Ring
from gateway.tasks import Spawner
from gateway.validation import describe

log = logging.getLogger("gateway.pins")

PIN_RECORD = "p\x1e"  # a pin's record key: this, then its digest (request ids hold no control bytes)
SEPARATOR = "\x1f"
LOCAL = 100_000  # pins this process keeps at hand: without Redis, the newest this many are all there is
# A lookup that finds nothing asks again after these pauses (about a second in all: a write from another
# replica may be in flight), five lookups at most: an unknown id costs the store little.
AGAIN_S = (0.05, 0.15, 0.3, 0.5)
WARN_EVERY_S = 60.0


@dataclass(frozen=True, slots=True)
class Pin:
    route: str
    arm: str
    server: str


class PreviousResponseUnknown(InvalidRequest):
    status = 404
    default_code = "previous_response_not_found"


class Pins:
    def __init__(
        self,
        store: RecordStore,
        spawner: Spawner,
        shared: bool,
        on_dropped: Callable[[float], object] | None = None,
    ) -> None:
        self._store = store
        self._spawner = spawner
        self._shared = shared  # other replicas write pins too: a miss is asked again for a moment
        self._local: Ring[Pin] = Ring(LOCAL)
        self._on_dropped = on_dropped
        self._warned = -WARN_EVERY_S

    def remember(self, kind: str, ref: str, scope: str | None, route: Route, arm: RouteArm) -> None:
        """A response (or conversation) made on this arm. Kept here at once; the store's copy is written in
        the background."""
        key = _key(kind, ref, scope)
        pin = Pin(route.name, arm.name, arm.server)
        if self._local.get(key) == pin:
            return
        self._local.put(key, pin)
        if self._shared:  # alone, this process's own copy is the only one needed
            self._spawner.spawn(self._write(key, pin), "pin")

    async def _write(self, key: str, pin: Pin) -> None:
        try:
            dropped = await self._store.remember({key: SEPARATOR.join((pin.route, pin.arm, pin.server))})
        except StateUnavailable:
            now = time.monotonic()
            if now - self._warned >= WARN_EVERY_S:  # once a minute, not once per answer
                self._warned = now
                log.warning(
                    "state store unreachable: the arms of new responses are known to this replica only"
                )
            return
        if dropped and self._on_dropped is not None:
            self._on_dropped(dropped)

    async def recall(self, kind: str, ref: str, scope: str | None, wait: bool = True) -> Pin | None:
        """wait: on a miss, ask again for a moment (a response just made on another replica); not for a
        conversation, whose first turn is a miss by nature."""
        key = _key(kind, ref, scope)
        found = self._local.get(key)
        if found is not None or not self._shared:
            return found  # alone, every pin is here
        pauses = list(AGAIN_S) if wait else []
        while True:
            try:
                raw = await self._store.recall(key)
            except StateUnavailable as exc:
                raise Unavailable(
                    f"the state store (Redis) cannot be reached: which server holds this {kind} is not "
                    "known; retry shortly"
                ) from exc
            if raw is not None:
                route, arm, server = [*raw.split(SEPARATOR), "", ""][:3]
                found = Pin(route, arm, server)
                self._local.put(key, found)
                return found
            if not pauses:
                return None
            await asyncio.sleep(pauses.pop(0))


def _key(kind: str, ref: str, scope: str | None) -> str:
    """Bounded whatever the client sent; scope: the client's API key when keys are required (one client
    cannot reach another's responses through the gateway's records)."""
    return PIN_RECORD + hashlib.sha256(f"{kind}\x1f{scope or ''}\x1f{ref}".encode()).hexdigest()[:32]


PREVIOUS = "previous_response_id"


def references(payload: dict[str, Any]) -> tuple[str | None, str | None]:
    """(previous_response_id, conversation id) of a Responses request, each checked to be a string."""
    previous = payload.get(PREVIOUS)
    if previous is not None and not isinstance(previous, str):
        raise wrong_type(PREVIOUS, "a string", previous, "a response id")
    if previous == "":
        raise InvalidRequest(f"'{PREVIOUS}' is empty: give a response id", param=PREVIOUS)
    conversation = payload.get("conversation")
    if isinstance(conversation, dict):
        conversation = conversation.get("id")
    if conversation is not None and (not isinstance(conversation, str) or not conversation):
        raise InvalidRequest(
            "'conversation' must be a conversation id (a string) or {\"id\": <conversation id>}, not "
            f"{describe(conversation) if conversation != '' else 'an empty string'}",
            param="conversation",
        )
    return previous, conversation


def pinned_arm(pin: Pin, route: Route, ref: str, param: str) -> RouteArm:
    """The arm of this route whose server holds the state, or a clear refusal."""
    for arm in route.arms():
        if arm.server == pin.server:
            return arm
    held = f"the {pin.arm} arm of route {pin.route!r}"
    raise InvalidRequest(
        f"{param} {ref[:100]!r} is held by {held}, whose server route {route.name!r} no longer sends to "
        "(the rollout moved on); start a new conversation without it",
        code="previous_response_unavailable",
        param=param,
    )
