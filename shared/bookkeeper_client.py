"""The bookkeeper's query API: request/response models (the RPC contract) and a typed client.

Requests go over core NATS request/reply to `caduceus.rpc.bookkeeper.<method>` (see
shared/subjects.rpc_subject); the bookkeeper answers with an `RpcReply` JSON document whose
`result` is the method's response model. The UI and the CLI use `BookkeeperClient`:

    client = BookkeeperClient(bus)              # or BookkeeperClient(nc) with a plain connection
    page = await client.events(series_uid=uid, limit=100)
    for event in page.events: ...

A bookkeeper that is not running gives `BookkeeperUnavailable` (no responders / timeout); a query
the bookkeeper rejected gives `BookkeeperError` with its message.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, TypeVar

import nats.errors
from pydantic import BaseModel, ConfigDict, Field

from shared.events import Event
from shared.subjects import rpc_subject

SERVICE = "bookkeeper"
MAX_LIMIT = 5000


class BookkeeperError(RuntimeError):
    """The bookkeeper answered with an error."""


class BookkeeperUnavailable(BookkeeperError):
    """Nobody answered: the bookkeeper is not running or not reachable."""


# ------------------------------------------------------------------ records

class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore")


class EventRecord(Event):
    """One row of the audit log: the envelope as published, and where and when it was stored."""

    id: int
    event_id: str
    stream: str  # type: ignore[assignment]  # always known for a stored event
    stream_seq: int  # type: ignore[assignment]
    recorded_at: datetime  # type: ignore[assignment]

    def to_event(self) -> Event:
        """The event as it was published (with its stream position)."""
        return Event.model_validate(self.model_dump())


class SeriesRecord(_Record):
    series_uid: str
    study_uid: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    modality: str | None = None
    description: str | None = None
    sender: str | None = None
    sender_host: str | None = None
    instance_count: int = 0
    first_received: datetime | None = None
    last_received: datetime | None = None
    status: str  # receiving / complete / routed / discarded / dispatched / error
    batch_id: str | None = None
    tasks_total: int = 0
    tasks_done: int = 0
    tasks_failed: int = 0
    last_event_type: str
    last_event_at: datetime


# What the bookkeeper's tasks view says of a task, in the order its life usually takes.
TASK_STATES = ("queued", "sending", "retrying", "done", "error")


class TaskRecord(_Record):
    task_id: str
    kind: str
    series_uid: str | None = None
    study_uid: str | None = None
    rule: str | None = None
    target: str | None = None
    priority: str | None = None
    state: str  # one of TASK_STATES
    attempts: int = 0
    last_error: str | None = None
    created_at: datetime
    updated_at: datetime
    last_event_type: str


class ConfigItemRecord(_Record):
    kind: str
    name: str
    item: dict[str, Any] | None = None
    deleted: bool = False
    version: int
    updated_by: str
    updated_at: datetime
    comment: str | None = None


class ServiceRecord(_Record):
    service: str
    state: str  # running / stopped / crashed / restarting
    instance: str | None = None
    pid: int | None = None
    host: str | None = None
    version: str | None = None
    last_started_at: datetime | None = None
    last_stopped_at: datetime | None = None
    last_stop_reason: str | None = None
    last_crashed_at: datetime | None = None
    last_exit_code: int | None = None
    starts: int = 0
    crashes: int = 0


# ------------------------------------------------------------------ requests and responses

class EventsRequest(BaseModel):
    series_uid: str | None = None
    study_uid: str | None = None
    task_id: str | None = None
    correlation_id: str | None = None
    type: str | None = Field(default=None, description="exact type, or a prefix ending in '*' (e.g. 'dispatch.*')")
    stream: str | None = Field(default=None, description="EVENTS or CONFIG; default both")
    since_seq: int = Field(default=0, ge=0, description="only events with stream_seq greater than this")
    limit: int = Field(default=100, ge=1, le=MAX_LIMIT)
    newest: bool = Field(default=False, description="the last `limit` events stored (still returned oldest "
                                                     "first) instead of the first ones")


class EventsResponse(BaseModel):
    events: list[EventRecord]
    next_since_seq: int | None = Field(description="since_seq for the next page; None when this page is not full")


class SeriesRequest(BaseModel):
    status: str | None = None
    study_uid: str | None = None
    patient_id: str | None = None
    modality: str | None = None
    sender: str | None = None
    search: str | None = Field(default=None, description="substring of patient name/id, description or UID")
    offset: int = Field(default=0, ge=0)
    limit: int = Field(default=50, ge=1, le=MAX_LIMIT)


class SeriesResponse(BaseModel):
    series: list[SeriesRecord]
    total: int


class SeriesHistoryRequest(BaseModel):
    series_uid: str
    limit: int = Field(default=2000, ge=1, le=MAX_LIMIT * 4)


class SeriesHistoryResponse(BaseModel):
    series: SeriesRecord | None
    tasks: list[TaskRecord]
    events: list[EventRecord]  # the series' events and its tasks' events, in stream order


class TasksRequest(BaseModel):
    state: str | None = None
    series_uid: str | None = None
    target: str | None = None
    kind: str | None = None
    offset: int = Field(default=0, ge=0)
    limit: int = Field(default=100, ge=1, le=MAX_LIMIT)


class TasksResponse(BaseModel):
    tasks: list[TaskRecord]
    total: int


class CountRequest(BaseModel):
    series_uid: str | None = None
    study_uid: str | None = None
    since: datetime | None = Field(default=None, description="occurred_at at or after")


class CountResponse(BaseModel):
    counts: dict[str, int]
    total: int


class ConfigItemsRequest(BaseModel):
    kind: str | None = None
    include_deleted: bool = False


class ConfigItemsResponse(BaseModel):
    items: list[ConfigItemRecord]


class ServicesRequest(BaseModel):
    pass


class ServicesResponse(BaseModel):
    services: list[ServiceRecord]


class StatsRequest(BaseModel):
    pass


class StatsResponse(BaseModel):
    database: str  # backend name, never the URL (it may hold a password)
    events_total: int
    duplicates_total: int
    last_stored_seq: dict[str, int]
    projected_seq: dict[str, int]
    series_by_status: dict[str, int]
    tasks_by_state: dict[str, int]
    oldest_event_at: datetime | None
    newest_event_at: datetime | None
    ingest: dict[str, Any] = Field(default_factory=dict, description="this process's counters")


class RpcReply(BaseModel):
    ok: bool
    error: str | None = None
    result: dict[str, Any] | None = None


# method name -> (request model, response model): the whole contract in one table
METHODS: dict[str, tuple[type[BaseModel], type[BaseModel]]] = {
    "events": (EventsRequest, EventsResponse),
    "series": (SeriesRequest, SeriesResponse),
    "series_history": (SeriesHistoryRequest, SeriesHistoryResponse),
    "tasks": (TasksRequest, TasksResponse),
    "count": (CountRequest, CountResponse),
    "config_items": (ConfigItemsRequest, ConfigItemsResponse),
    "services": (ServicesRequest, ServicesResponse),
    "stats": (StatsRequest, StatsResponse),
}

Resp = TypeVar("Resp", bound=BaseModel)


class BookkeeperClient:
    def __init__(self, bus_or_nc: Any, timeout: float = 10.0) -> None:
        # Accept a shared.bus.Bus (has .nc) or a bare nats Client.
        self.nc = getattr(bus_or_nc, "nc", bus_or_nc)
        self.timeout = timeout

    async def call(self, method: str, request: BaseModel, response_model: type[Resp]) -> Resp:
        subject = rpc_subject(SERVICE, method)
        try:
            msg = await self.nc.request(subject, request.model_dump_json().encode(), timeout=self.timeout)
        except nats.errors.NoRespondersError as exc:
            raise BookkeeperUnavailable(
                f"the bookkeeper is not running (nobody answers on {subject})") from exc
        except (nats.errors.TimeoutError, TimeoutError) as exc:
            raise BookkeeperUnavailable(
                f"the bookkeeper did not answer on {subject} within {self.timeout:g}s") from exc
        reply = RpcReply.model_validate_json(msg.data)
        if not reply.ok or reply.result is None:
            raise BookkeeperError(f"bookkeeper {method}: {reply.error or 'no result'}")
        return response_model.model_validate(reply.result)

    async def events(self, **filters: Any) -> EventsResponse:
        return await self.call("events", EventsRequest(**filters), EventsResponse)

    async def all_events(self, **filters: Any) -> list[EventRecord]:
        """Every matching event of one stream (default EVENTS), page by page."""
        filters.setdefault("stream", "EVENTS")
        filters.setdefault("limit", 1000)
        found: list[EventRecord] = []
        while True:
            page = await self.events(**filters)
            found.extend(page.events)
            if page.next_since_seq is None:
                return found
            filters["since_seq"] = page.next_since_seq

    async def series(self, **filters: Any) -> SeriesResponse:
        return await self.call("series", SeriesRequest(**filters), SeriesResponse)

    async def series_history(self, series_uid: str, limit: int = 2000) -> SeriesHistoryResponse:
        return await self.call("series_history", SeriesHistoryRequest(series_uid=series_uid, limit=limit),
                               SeriesHistoryResponse)

    async def tasks(self, **filters: Any) -> TasksResponse:
        return await self.call("tasks", TasksRequest(**filters), TasksResponse)

    async def count(self, **filters: Any) -> CountResponse:
        return await self.call("count", CountRequest(**filters), CountResponse)

    async def config_items(self, **filters: Any) -> ConfigItemsResponse:
        return await self.call("config_items", ConfigItemsRequest(**filters), ConfigItemsResponse)

    async def services(self) -> ServicesResponse:
        return await self.call("services", ServicesRequest(), ServicesResponse)

    async def stats(self) -> StatsResponse:
        return await self.call("stats", StatsRequest(), StatsResponse)
