"""The live set of routes: loaded from the policy directory, swapped atomically, kept on a bad reload."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from watchfiles import awatch

from gateway.loader import PolicyError, Problem, load_dir
from gateway.route import Route

log = logging.getLogger("gateway.policies")


class RouteTable:
    def __init__(
        self,
        policy_dir: Path,
        environ: Mapping[str, str] | None = None,
        on_reload: Callable[[bool], object] | None = None,
        overlay: Callable[[Route], Route] | None = None,
    ) -> None:
        self.policy_dir = policy_dir
        self._environ = environ
        self._on_reload = on_reload
        self._overlay = overlay  # the live rollout state laid over each route (its weight, its mirror)
        self._compiled: dict[str, Route] = {}
        self._routes: dict[str, Route] = {}
        self.loaded_at: float | None = None
        self.reloads = 0
        self.last_problems: list[Problem] = []
        self._reloading = asyncio.Lock()

    def get(self, name: str) -> Route | None:
        return self._routes.get(name)

    def routes(self) -> list[Route]:
        return list(self._routes.values())

    def policies(self) -> list[Route]:
        """Every route as its policy file says, before the rollout state is laid over it."""
        return list(self._compiled.values())

    def compiled(self, name: str) -> Route | None:
        """The route as its policy file says, before the rollout state is laid over it."""
        return self._compiled.get(name)

    def refresh(self, name: str) -> None:
        """The rollout state of a route changed: serve it from the next request on."""
        route = self._compiled.get(name)
        if route is not None and self._overlay is not None:
            self._routes = {**self._routes, name: self._overlay(route)}

    def load(self) -> None:
        """First load: raises PolicyError when the directory cannot be served."""
        routes, problems = load_dir(self.policy_dir, self._environ)
        errors = [p for p in problems if p.severity == "error"]
        if errors:
            raise PolicyError(errors)
        self._swap(routes)

    async def reload(self) -> bool:
        """Later loads, parsed and compiled in a worker thread (a large or hostile file never stalls the
        serving loop), then swapped in on the loop: an invalid directory is reported and the current routes
        keep serving."""
        async with self._reloading:  # one at a time, in the order asked
            routes, problems = await asyncio.to_thread(load_dir, self.policy_dir, self._environ)
            return self._apply(routes, problems)

    def _apply(self, routes: dict[str, Route], problems: list[Problem]) -> bool:
        errors = [p for p in problems if p.severity == "error"]
        self.last_problems = errors
        if errors:
            for problem in errors:
                log.error("policy reload rejected, keeping the previous policies: %s", problem)
            if self._on_reload is not None:
                self._on_reload(False)
            return False
        changed = sorted(
            name
            for name in routes.keys() | self._routes.keys()
            if name not in self._routes
            or name not in routes
            or routes[name].policy != self._compiled[name].policy
        )
        self._swap(routes)
        self.reloads += 1
        if self._on_reload is not None:
            self._on_reload(True)
        log.info(
            "policies reloaded from %s: %d routes (changed: %s)",
            self.policy_dir,
            len(routes),
            ", ".join(changed) or "none",
        )
        return True

    def _swap(self, routes: dict[str, Route]) -> None:
        self._compiled = routes
        overlay = self._overlay
        # One assignment: a request sees the old table or the new one, never a mix.
        self._routes = {n: overlay(r) for n, r in routes.items()} if overlay is not None else routes
        self.loaded_at = time.time()

    async def watch(self, debounce_ms: int = 300, poll_s: float = 0.5) -> None:
        """Reload whenever a file in the policy directory changes (ConfigMap symlink swaps included). A
        directory deleted and created again is a new one to the OS's watcher: wait for it, reload, and
        watch the new one (the previous policies keep serving meanwhile)."""
        reload = False
        while True:
            if not self.policy_dir.is_dir():
                await asyncio.sleep(poll_s)
                reload = True
                continue
            if reload:
                await self.reload()
            inode = self.policy_dir.stat().st_ino
            async for _ in awatch(self.policy_dir, debounce=debounce_ms, step=50, watch_filter=None):
                await self.reload()
                if not self.policy_dir.is_dir() or self.policy_dir.stat().st_ino != inode:
                    break  # the directory went away (or was replaced): watch whatever comes next
            reload = True
