"""Schema work that may take long, in worker processes, each piece under a time limit.

jsonschema-rs holds the GIL while it compiles or validates, so a thread would not spare the serving loop,
and some checks have no useful bound on their cost: a recursive oneOf doubles its work with each level of
the answer (14 levels of a 60-byte answer took 1.8 s here). Such checks, and those of large answers or
schemas, go to a few worker processes (`python -m gateway.checks`, one socket each, framed by
multiprocessing.connection). A check past the time limit is given up: its worker is killed and replaced,
and the answer is treated as failing the schema, saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson

from gateway.validation import (
    Deferred,
    Failure,
    Schema,
    SchemaCache,
    SchemaError,
    compile_schema,
    first_error,
)

log = logging.getLogger("gateway.checks")

WORKERS = 2
WORKER_CACHE_BYTES = 32 * 1024 * 1024  # compiled schemas each worker keeps (see compiled_size)
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT_S = 60.0  # a worker imports jsonschema-rs and orjson, then says it is ready


class TimedOut(Exception):
    """The worker did not answer within the time limit (it has been killed)."""


class Worker:
    """One worker process and its end of the socket. Used by one thread at a time."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)  # the gateway package importable however the gateway was started
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (_PACKAGE_ROOT, env.get("PYTHONPATH"))))
        with theirs:
            self.process = subprocess.Popen(  # noqa: S603 (our own module, no client input)
                [sys.executable, "-m", "gateway.checks", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        self.conn = Connection(os.dup(ours.fileno()))
        ours.close()
        if not self.conn.poll(START_TIMEOUT_S) or self.conn.recv_bytes() != b"ready":
            self.stop()
            raise RuntimeError("the schema check worker did not start")

    def ask(self, request: bytes, timeout_s: float) -> Any:
        self.conn.send_bytes(request)
        if not self.conn.poll(timeout_s):
            self.stop()
            raise TimedOut
        return orjson.loads(self.conn.recv_bytes())

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        self.conn.close()


class SchemaChecks:
    """A few workers, started on first use; a request waits for a free one (its wait counts towards its
    deadline, not towards the check's time limit)."""

    def __init__(self, timeout_s: float, workers: int = WORKERS) -> None:
        self.timeout_s = timeout_s
        self._free: asyncio.Queue[Worker | None] = asyncio.Queue()
        for _ in range(workers):
            self._free.put_nowait(None)  # a place for a worker, started when first needed
        self._lock = threading.Lock()
        self._all: set[Worker] = set()
        self._threads = ThreadPoolExecutor(workers, thread_name_prefix="schema-check")
        self.timed_out = 0  # checks given up on, for /admin/runtime

    async def first_failure(self, checks: list[Deferred]) -> Failure | None:
        """The first of these checks that fails (a check past the time limit fails, saying so)."""
        for check in checks:
            reply = await self._ask(b"check", check.schema.text, check.instance)
            if reply is _TIMED_OUT:
                return check.failed(
                    f": checking the answer against the schema took longer than {self.timeout_s:g}s "
                    "(CANARYGATE_SCHEMA_CHECK_TIMEOUT_S), so it is treated as not matching it"
                )
            if reply is _FAILED:
                return check.failed(
                    ": the schema check could not run (its worker failed; see the gateway's log), so the "
                    "answer is treated as not matching it"
                )
            if reply is not None:
                return check.failed(str(reply))
        return None

    async def compile(self, schema: Schema, where: str) -> None:
        """Compiles a schema in a worker (where it is kept for the checks); SchemaError if it does not."""
        reply = await self._ask(b"compile", schema.text, "")
        if reply is _TIMED_OUT:
            raise SchemaError(f"{where} took longer than {self.timeout_s:g}s to compile; simplify it", where)
        if reply is _FAILED:
            raise RuntimeError("the schema check worker failed")
        if reply is not None:
            raise SchemaError(f"{where} is not a valid JSON Schema: {reply}", where)

    async def _ask(self, op: bytes, text: bytes, instance: str) -> Any:
        request = orjson.dumps([op.decode(), text.decode(), instance])
        worker = await self._free.get()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()

        def run() -> None:  # on a thread: the worker goes back to the queue whatever becomes of the request
            current = worker
            try:
                if current is None:
                    current = self._start()
                result: Any = current.ask(request, self.timeout_s)
            except TimedOut:
                assert current is not None
                self._forget(current)
                current, result = None, _TIMED_OUT
            except Exception:  # a worker that died or would not start: replaced, and never a lost place
                log.exception("a schema check worker failed")
                if current is not None:
                    self._forget(current)
                    current.stop()
                current, result = None, _FAILED
            with contextlib.suppress(RuntimeError):  # the loop has closed: the gateway is gone
                loop.call_soon_threadsafe(self._release, current, done, result)

        self._threads.submit(run)  # one thread per worker, each waiting on its worker's answer
        return await done

    def _release(self, worker: Worker | None, done: asyncio.Future[Any], result: Any) -> None:
        self._free.put_nowait(worker)
        if result is _TIMED_OUT:
            self.timed_out += 1
            log.warning("a schema check took longer than %gs; its worker was replaced", self.timeout_s)
        if not done.done():
            done.set_result(result)

    def _start(self) -> Worker:
        worker = Worker()
        with self._lock:
            self._all.add(worker)
        return worker

    def _forget(self, worker: Worker) -> None:
        with self._lock:
            self._all.discard(worker)

    def stats(self) -> dict[str, int]:
        """Workers running (they start on first use), their RSS together, and checks given up on."""
        with self._lock:
            pids = [worker.process.pid for worker in self._all]
        rss = 0
        for pid in pids:
            with contextlib.suppress(OSError, IndexError, ValueError):  # gone meanwhile, or not Linux
                rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return {"workers": len(pids), "rss_bytes": rss, "timed_out": self.timed_out}

    def close(self) -> None:
        with self._lock:
            workers, self._all = self._all, set()
        for worker in workers:
            worker.stop()
        self._threads.shutdown(wait=False, cancel_futures=True)


_TIMED_OUT = object()
_FAILED = object()


def serve(conn: Connection) -> None:
    """The worker: compiles (keeping the most recent schemas) and checks, one request at a time."""
    cache = SchemaCache(max_bytes=WORKER_CACHE_BYTES)
    conn.send_bytes(b"ready")
    while True:
        try:
            op, text, instance = orjson.loads(conn.recv_bytes())
        except EOFError:
            return
        reply: str | None
        try:
            schema = cache.find(text.encode())
            if schema is None:
                schema = compile_schema(orjson.loads(text), "the schema")
                cache.add(schema)
            assert schema.validator is not None
            reply = first_error(schema.validator, orjson.loads(instance)) if op == "check" else None
        except SchemaError as exc:
            reply = str(exc).removeprefix("the schema is not a valid JSON Schema: ")
        conn.send_bytes(orjson.dumps(reply))


if __name__ == "__main__":
    serve(Connection(int(sys.argv[1])))
