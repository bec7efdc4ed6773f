"""Serves the query API on `caduceus.rpc.bookkeeper.<method>` (contract: shared/bookkeeper_client.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from nats.aio.msg import Msg
from pydantic import ValidationError
from sqlalchemy import Engine

from services.bookkeeper.queries import run_query
from shared.bookkeeper_client import METHODS, SERVICE, RpcReply
from shared.subjects import RPC_PREFIX

log = logging.getLogger(__name__)

QUEUE_GROUP = "bookkeeper"


class RpcServer:
    def __init__(self, nc: Any, engine: Engine, extra_stats: Callable[[], dict[str, Any]]) -> None:
        self.nc = nc
        self.engine = engine
        self.extra_stats = extra_stats
        self.sub: Any = None
        # Bounded so that a burst of UI queries cannot take every database connection.
        self.limiter = asyncio.Semaphore(4)

    async def start(self) -> None:
        # A queue group: several bookkeeper processes share the queries.
        self.sub = await self.nc.subscribe(f"{RPC_PREFIX}.{SERVICE}.*", queue=QUEUE_GROUP, cb=self.handle)

    async def stop(self) -> None:
        if self.sub is not None:
            await self.sub.unsubscribe()

    async def handle(self, msg: Msg) -> None:
        method = msg.subject.rsplit(".", 1)[-1]
        reply = await self.answer(method, msg.data)
        if msg.reply:
            await msg.respond(reply.model_dump_json().encode())

    async def answer(self, method: str, data: bytes) -> RpcReply:
        if method not in METHODS:
            return RpcReply(ok=False, error=f"unknown method {method!r}; known: {', '.join(sorted(METHODS))}")
        request_model, _ = METHODS[method]
        try:
            request = request_model.model_validate_json(data or b"{}")
        except ValidationError as exc:
            return RpcReply(ok=False, error=f"invalid request: {exc}")
        try:
            async with self.limiter:
                result = await asyncio.to_thread(run_query, self.engine, method, request)
        except Exception as exc:  # noqa: BLE001 - the caller gets the reason; the service keeps serving
            log.exception("query %s failed", method)
            return RpcReply(ok=False, error=f"{type(exc).__name__}: {exc}")
        payload = result.model_dump(mode="json")
        if method == "stats":
            payload["ingest"] = self.extra_stats()
        return RpcReply(ok=True, result=payload)
