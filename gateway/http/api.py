"""The HTTP API and dashboard, served by the gateway process in its own event loop (aiohttp).

``async with HttpApi(status, settings, ...) as api:`` listens on ``settings.host:port`` (``api.url``).
Store queries run on one dedicated thread with a read-only SQLite connection, so the event loop
never waits on the disk. Counts and readiness come from the gateway's status (gateway/status.py);
what the API shows of the catalog, alerts and radio signal comes through the small protocols in
gateway/http/views.py. Nothing here knows the gateway object itself.

Every answer is JSON (``format=csv`` where a table makes sense); every error is a problem object
(``application/problem+json``) that names the parameter at fault. ``/openapi.json`` describes it all.
"""

from __future__ import annotations

import asyncio
import csv
import errno
import io
import logging
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, SecretStr

from gateway.alerts import Alert
from gateway.config import HttpSettings
from gateway.errors import GatewayError
from gateway.http import models as m
from gateway.http.answers import HttpError, bad, json_response, problem_response
from gateway.http.auth import OPEN_PATHS, authorized
from gateway.http.guard import cross_site_refusal, host_allowed
from gateway.http.models import API
from gateway.http.openapi import openapi_document
from gateway.http.portal import PortalRoutes
from gateway.http.views import AlertView, CatalogView, NoSignal, SignalView
from gateway.portal import Portal
from gateway.query import AGGREGATES, QueryError, iso_ms, parse_duration, parse_time, query_series
from gateway.status import BrokerStatus, StatusSource, broker_readiness
from pipeline.db import SqliteThread
from pipeline.store import READER_PRAGMAS, StoreReader, db_path

log = logging.getLogger(__name__)
T = TypeVar("T")
AUTO_POINTS = 500
MAX_RAW_POINTS = 100_000
# "auto" picks the smallest of these at least (range / points) long
NICE_BUCKETS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400,
                  2 * 86400, 7 * 86400, 30 * 86400)
_DASHBOARD = "dashboard"


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def spreadsheet_safe(value: object) -> object:
    """A CSV cell a spreadsheet will not run: text starting with ``=``, ``+``, ``-``, ``@``, a tab or a
    carriage return gets a leading ``'`` (CSV formula injection), unless it is a plain number (a
    negative reading stays a number)."""
    if isinstance(value, str) and value.startswith(_FORMULA_START) and not _PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value


def _csv(header: list[str], rows: Iterable[Iterable[object]]) -> web.Response:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(["" if v is None else spreadsheet_safe(v) for v in row] for row in rows)
    return web.Response(text=out.getvalue(), content_type="text/csv")


def _format(request: web.Request) -> str:
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise bad("format", f"must be json or csv, not {fmt!r}")
    return fmt


class _Store:
    """The store, read-only, on a thread of its own; opened at first use, and again after a failure
    (the API may answer before the store has a file)."""

    def __init__(self, data_dir: Path) -> None:
        self._db = SqliteThread(db_path(data_dir), readonly=True, pragmas=READER_PRAGMAS)

    async def run(self, fn: Callable[[StoreReader], T]) -> T:
        if not self._db.is_open:
            await self._db.open()
        return await self._db.run(lambda conn: fn(StoreReader(conn)))

    async def close(self) -> None:
        await self._db.close()


def _nice_bucket(span_ms: int, points: int) -> int:
    want_s = span_ms / 1000 / max(1, points)
    return 1000 * next((b for b in NICE_BUCKETS_S if b >= want_s), math.ceil(want_s))


def _alert_out(alert: Alert) -> m.AlertOut:
    return m.AlertOut(
        id=alert.id, name=alert.name, subject=alert.subject, severity=alert.severity,
        raised_at=iso_ms(int(alert.raised_at.timestamp() * 1000)),
        cleared_at=iso_ms(int(alert.cleared_at.timestamp() * 1000)) if alert.cleared_at else None,
        detail=alert.detail,
    )


def _broker_metrics(broker: BrokerStatus) -> Iterator[Metric]:
    """The embedded broker: clients, what its sessions hold, and each bound hit (gateway/config/broker.py)."""
    yield GaugeMetricFamily("iotgw_broker_clients", "Connected MQTT clients", value=broker.clients)
    yield GaugeMetricFamily("iotgw_broker_connections", "Open MQTT connections, before CONNECT included",
                            value=broker.connections)
    yield GaugeMetricFamily("iotgw_broker_queued_bytes", "Topics and payloads queued in MQTT sessions",
                            value=broker.sessions.bytes)
    yield GaugeMetricFamily("iotgw_broker_retained_messages", "Retained MQTT messages", value=broker.retained.messages)
    limits = CounterMetricFamily("iotgw_broker_limit_hits", "Times a [broker] bound was hit", labels=["limit"])
    for name, count in broker.limits.model_dump().items():
        limits.add_metric([name], count)
    denied = CounterMetricFamily("iotgw_broker_denied", "Refusals by the ACL or session ownership", labels=["what"])
    for name, count in (broker.security.denied if broker.security else {}).items():
        denied.add_metric([name], count)
    offences = CounterMetricFamily("iotgw_broker_offences", "Connections closed for bad input", labels=["reason"])
    for name, count in broker.offences.items():
        offences.add_metric([name], count)
    yield from (limits, denied, offences)


class StatsCollector(Collector):
    """Prometheus metrics read from the gateway's status at scrape time (registered on a private registry)."""

    def __init__(self, status: StatusSource, alerts: AlertView) -> None:
        self._status = status
        self._alerts = alerts

    def collect(self) -> Iterator[Metric]:
        s = self._status()
        stage_in = CounterMetricFamily("iotgw_stage_in", "Items a pipeline stage received", labels=["stage"])
        stage_out = CounterMetricFamily("iotgw_stage_out", "Items a pipeline stage passed on", labels=["stage"])
        rejected = CounterMetricFamily("iotgw_stage_rejected", "Items a stage rejected, by reason",
                                       labels=["stage", "reason"])
        for name, st in s.stages.items():
            stage_in.add_metric([name], st.in_)
            stage_out.add_metric([name], st.out)
            for reason, count in st.rejected.items():
                rejected.add_metric([name, reason], count)
        yield from (stage_in, stage_out, rejected)

        queue = s.queue
        yield GaugeMetricFamily("iotgw_queue_depth", "Messages waiting for the pipeline", value=queue.depth)
        yield GaugeMetricFamily("iotgw_queue_capacity", "Pipeline queue size", value=queue.max)
        yield GaugeMetricFamily("iotgw_queue_high_water", "Deepest the pipeline queue has been",
                                value=queue.high_water)
        yield CounterMetricFamily("iotgw_queue_producer_waits", "Times ingestion waited for room in the queue",
                                  value=queue.producer_waits)

        frames = CounterMetricFamily("iotgw_driver_frames", "Frames a driver decoded", labels=["driver"])
        readings = CounterMetricFamily("iotgw_driver_readings", "Readings a driver produced", labels=["driver"])
        errors = CounterMetricFamily("iotgw_driver_errors", "Frames a driver could not decode, by reason",
                                     labels=["driver", "reason"])
        connected = GaugeMetricFamily("iotgw_driver_connected", "1 while the driver's device is open",
                                      labels=["driver"])
        for name, d in s.drivers.items():
            frames.add_metric([name], d.frames)
            readings.add_metric([name], d.readings)
            connected.add_metric([name], 1 if d.connected else 0)
            for reason, count in d.errors.items():
                errors.add_metric([name, reason], count)
        yield from (frames, readings, errors, connected)

        yield CounterMetricFamily("iotgw_stored_readings", "Readings written to the store", value=s.stored)
        published = CounterMetricFamily("iotgw_published_events", "Events published on the broker",
                                        labels=["kind"])
        published.add_metric(["events"], s.published.events)
        published.add_metric(["rejects"], s.published.rejects)
        yield published
        yield CounterMetricFamily("iotgw_journal_appended", "Raw messages written to the ingest journal",
                                  value=s.journal.appended)
        yield from _broker_metrics(s.broker)

        gauges = {key: GaugeMetricFamily(f"iotgw_outbox_{key}", help_, labels=["destination"]) for key, help_ in (
            ("depth", "Events waiting in the outbox"), ("bytes", "Bytes waiting in the outbox"),
            ("oldest_age_seconds", "Age of the oldest waiting event"))}
        counters = {key: CounterMetricFamily(f"iotgw_outbox_{key}", help_, labels=["destination"]) for key, help_ in (
            ("delivered", "Events the backbone acknowledged"), ("dropped", "Events dropped by a full outbox"))}
        backbone = GaugeMetricFamily("iotgw_backbone_connected", "1 while the destination is connected",
                                     labels=["destination"])
        for name, f in s.forward.destinations.items():
            gauges["depth"].add_metric([name], f.depth)
            gauges["bytes"].add_metric([name], f.bytes)
            gauges["oldest_age_seconds"].add_metric([name], f.oldest_age_s)
            counters["delivered"].add_metric([name], f.delivered)
            counters["dropped"].add_metric([name], f.dropped)
            backbone.add_metric([name], 1 if f.connected else 0)
        yield from (*gauges.values(), *counters.values(), backbone)
        yield GaugeMetricFamily("iotgw_alerts_active", "Alerts currently active", value=len(self._alerts.active()))
        changes = CounterMetricFamily("iotgw_alert_changes", "Alerts raised and cleared by a stage, and alert "
                                      "changes it failed to record in the store", labels=["stage", "change"])
        for stage, counts in (("analyze", s.analyze.alerts), ("liveness", s.liveness.alerts)):
            for change, count in counts.items():
                changes.add_metric([stage, change], count)
        yield changes
        yield GaugeMetricFamily("iotgw_devices_silent", "Devices silent for longer than their inactivity rule allows",
                                value=s.liveness.silent)


class HttpApi:
    """``async with HttpApi(status, settings, ...) as api``: serving on ``api.url`` until the block ends.

    ``status`` gives the gateway's status (``Gateway.status``); ``data_dir`` holds the store it reads."""

    def __init__(
        self, status: StatusSource, settings: HttpSettings, *, data_dir: Path, catalog: CatalogView,
        alerts: AlertView, signal: SignalView | None = None, port_option: str = "[http] port",
        fallback_to_any_port: bool = False, portal: Portal | None = None,
    ) -> None:
        self._status = status
        self.portal = portal
        self.settings = settings
        self.catalog = catalog
        self.alerts = alerts
        self.signal = signal or NoSignal()
        self._port_option = port_option
        self._fallback = fallback_to_any_port
        self._token: SecretStr | None = settings.resolve_token() if settings.needs_token else None
        self._store = _Store(data_dir)
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(StatsCollector(status, alerts))
        self._runner: web.AppRunner | None = None
        self.port = settings.port
        self.app = self._build_app()

    @property
    def url(self) -> str:
        host = self.settings.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host  # noqa: S104
        return f"http://{shown}:{self.port}/"

    async def __aenter__(self) -> Self:
        self._runner = web.AppRunner(self.app, access_log=None)  # access logs: journald noise, and no headers
        await self._runner.setup()
        try:
            self.port = await self._bind(self.settings.port)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or not self._fallback:
                await self._runner.cleanup()
                if exc.errno == errno.EADDRINUSE:
                    raise GatewayError(
                        f"HTTP port {self.settings.port} on {self.settings.host} is already in use: stop what holds "
                        f"it or choose another port with {self._port_option}"
                    ) from None
                raise GatewayError(f"the HTTP API cannot listen on {self.settings.host}:{self.settings.port}: "
                                   f"{exc.strerror}") from None
            log.warning("HTTP port %d is in use: serving on any free port instead", self.settings.port)
            self.port = await self._bind(0)
        log.info("HTTP API and dashboard on %s%s", self.url, " (bearer token required)" if self._token else "")
        return self

    async def _bind(self, port: int) -> int:
        assert self._runner is not None
        site = web.TCPSite(self._runner, self.settings.host, port)
        await site.start()
        server = site._server  # aiohttp keeps the asyncio server here; its sockets know the bound port
        sockets = getattr(server, "sockets", None) or []
        return int(sockets[0].getsockname()[1]) if sockets else port

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        await self._store.close()

    # -- the application ----------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._same_site, self._auth])
        get = app.router.add_get
        get("/", self._index)
        app.router.add_static("/static/", Path(str(resources.files("gateway.http") / _DASHBOARD)), name="static")
        get("/healthz", self._healthz)
        get("/readyz", self._readyz)
        get("/metrics", self._metrics)
        get("/openapi.json", self._openapi)
        get(f"{API}/devices", self._devices)
        get(f"{API}/latest", self._latest)
        get(f"{API}/series", self._series)
        get(f"{API}/alerts", self._alerts)
        get(f"{API}/catalog", self._catalog)
        get(f"{API}/catalog/asyncapi.json", self._asyncapi)
        get(f"{API}/stats", self._stats)
        if self.portal is not None:
            PortalRoutes(self.portal).add_to(app, f"{API}/portal")
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        try:
            return await handler(request)
        except HttpError as exc:
            return problem_response(exc.problem)
        except web.HTTPException as exc:  # aiohttp's own 404 / 405
            if exc.status < 400:
                raise
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return problem_response(m.Problem(title=exc.reason, status=exc.status,
                                               detail=f"{request.method} {request.path}: {exc.reason.lower()}"),
                                     headers)
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.path)
            return problem_response(m.Problem(title="Internal error", status=500,
                                               detail="the gateway failed to answer; see its log"))

    @web.middleware
    async def _same_site(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """DNS rebinding and cross-site requests: a Host the API does not serve is refused (421), and so is
        a state-changing request from a page of another origin (403), before any token check."""
        if request.path in OPEN_PATHS:
            return await handler(request)
        host = request.headers.get("Host", "")
        if not self._serves(host):
            return problem_response(m.Problem(
                title="Misdirected Request", status=421,
                detail=f"this API does not serve the host {host!r}: reach it by its address, or name the host "
                       "in [http] allowed_hosts",
            ))
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            refusal = cross_site_refusal(request.headers.get("Origin"), request.headers.get("Sec-Fetch-Site"), host)
            if refusal is not None:
                return problem_response(m.Problem(title="Forbidden", status=403, detail=refusal))
        return await handler(request)

    def _serves(self, host_header: str) -> bool:
        return host_allowed(host_header, bound=self.settings.host, port=self.port,
                            allowed=self.settings.allowed_hosts)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        """Everything but liveness and the dashboard's static files (they hold no data) needs the token."""
        open_ = request.path in OPEN_PATHS or request.path == "/" or request.path.startswith("/static/")
        if self._token is not None and not open_ and not authorized(request.headers.get("Authorization"),
                                                                     self._token):
            return problem_response(
                m.Problem(title="Unauthorized", status=401,
                          detail="this gateway's API needs a bearer token: Authorization: Bearer <token>"),
                {"WWW-Authenticate": 'Bearer realm="iotgw"'},
            )
        return await handler(request)

    # -- handlers -----------------------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(Path(str(resources.files("gateway.http") / _DASHBOARD / "index.html")))

    async def _healthz(self, request: web.Request) -> web.Response:
        return json_response(m.Health(status="ok"))

    async def _readyz(self, request: web.Request) -> web.Response:
        status = self._status()
        checks: dict[str, str] = {}
        checks["broker"] = broker_readiness(status.broker)
        checks["pipeline"] = "up" if status.pipeline.running else "the pipeline task is not running"
        if problems := [f"{name}: {d.error}" for name, d in status.forward.destinations.items() if d.error]:
            checks["forward"] = "; ".join(problems)  # a config problem: the outbox fills until it is fixed
        try:
            async with asyncio.timeout(5.0):
                await self._store.run(lambda s: s.count_series())
            checks["store"] = "up"
        except Exception as exc:  # StoreError, sqlite3.Error, a timeout: whatever it is, not ready
            checks["store"] = f"cannot read the store: {exc or type(exc).__name__}"
        down = {k: v for k, v in checks.items() if v != "up"}
        if down:
            detail = "; ".join(f"{k}: {v}" for k, v in down.items())
            return web.Response(status=503, text=m.Health(status="unavailable", checks=checks).model_dump_json(),
                                content_type="application/json", reason=detail[:200])
        return json_response(m.Health(status="ok", checks=checks))

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def _openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_document(secured=self._token is not None, portal=self.portal is not None))

    async def _devices(self, request: web.Request) -> web.Response:
        fmt = _format(request)

        def read(store: StoreReader) -> tuple[list[Any], list[tuple[str, str, str | None, int, float]]]:
            return store.devices(), store.latest()

        rows, latest = await self._store.run(read)
        last = {(d, metric): value for d, metric, _, _, value in latest}
        devices = [
            m.Device(
                device_id=r.device_id, transport=r.transport, device_class=r.device_class, site=r.site,
                first_seen=iso_ms(r.first_seen_ms), last_seen=iso_ms(r.last_seen_ms), metrics=list(r.metrics),
                rssi_dbm=self._rssi(r.device_id, last.get((r.device_id, "rssi"))),
                battery_pct=last.get((r.device_id, "battery")),
            )
            for r in rows
        ]
        if fmt == "csv":
            return _csv(["device_id", "transport", "device_class", "site", "first_seen", "last_seen", "metrics",
                         "rssi_dbm", "battery_pct"],
                        ([d.device_id, d.transport, d.device_class, d.site, d.first_seen, d.last_seen,
                          " ".join(d.metrics), d.rssi_dbm, d.battery_pct] for d in devices))
        return json_response(list[BaseModel](devices))

    def _rssi(self, device_id: str, stored: float | None) -> float | None:
        """What the radio reported, else the latest value of an ``rssi`` metric the device sent."""
        reported = self.signal.rssi(device_id)
        return reported if reported is not None else stored

    async def _latest(self, request: web.Request) -> web.Response:
        fmt = _format(request)
        device = request.query.get("device")
        rows = [r for r in await self._store.run(lambda s: s.latest()) if device is None or r[0] == device]
        values = [m.LatestValue(device_id=d, metric=metric, unit=unit, ts=iso_ms(ts), value=v)
                  for d, metric, unit, ts, v in rows]
        if fmt == "csv":
            return _csv(["device_id", "metric", "unit", "ts", "value"],
                        ([x.device_id, x.metric, x.unit, x.ts, repr(x.value)] for x in values))
        return json_response(list[BaseModel](values))

    async def _series(self, request: web.Request) -> web.Response:
        q = request.query
        fmt = _format(request)
        device, metric, start, end, agg, points_wanted = self._series_params(q)
        bucket_text = q.get("bucket")
        from_ms = int(start.timestamp() * 1000) if start is not None else None
        to_ms = int(end.timestamp() * 1000) if end is not None else None

        def run(store: StoreReader) -> tuple[str | None, int | None, list[tuple[int, float]]]:
            found = store.series_span(device, metric, from_ms, to_ms)
            if found is None:
                raise HttpError(404, "No such series", f"no series {device}/{metric} in the store")
            unit, first, last = found
            if bucket_text is None:
                count = store.count_range(device, metric, from_ms, to_ms)
                if count > MAX_RAW_POINTS:
                    raise bad("bucket", f"{count} raw points in this range, at most {MAX_RAW_POINTS}: "
                                         "give a bucket (e.g. bucket=auto or bucket=1m) or a shorter range")
                bucket_ms = None
            elif bucket_text == "auto":
                if first is None or last is None:
                    bucket_ms = 1000
                else:
                    span = (to_ms if to_ms is not None else last) - (from_ms if from_ms is not None else first)
                    bucket_ms = _nice_bucket(span, points_wanted)
            else:
                try:
                    bucket_ms = max(1, int(parse_duration(bucket_text).total_seconds() * 1000))
                except ValueError as exc:
                    raise bad("bucket", f"{exc}, or auto") from None
            try:
                points = query_series(store, device, metric, agg=agg, from_ms=from_ms, to_ms=to_ms,
                                      every=timedelta(milliseconds=bucket_ms) if bucket_ms else None)
            except QueryError as exc:
                raise bad("bucket", str(exc)) from None
            return unit, bucket_ms, [(p.ts_ms, p.value) for p in points]

        unit, bucket_ms, points = await self._store.run(run)
        if fmt == "csv":
            return _csv(["ts", "value"], ([iso_ms(ts), repr(v)] for ts, v in points))
        return json_response(m.Series.model_validate({
            "device_id": device, "metric": metric, "unit": unit, "agg": agg if bucket_ms else None,
            "bucket_ms": bucket_ms, "from": iso_ms(from_ms) if from_ms is not None else None,
            "to": iso_ms(to_ms) if to_ms is not None else None,
            "points": [m.SeriesPoint(ts=iso_ms(ts), value=v) for ts, v in points],
        }))

    def _series_params(self, q: Any) -> tuple[str, str, datetime | None, datetime | None, str, int]:
        device, metric = q.get("device"), q.get("metric")
        if not device:
            raise bad("device", "required: a device id (see /api/v1/devices)")
        if not metric:
            raise bad("metric", "required: a metric name (see /api/v1/devices)")
        now = datetime.now(UTC)
        start = self._time(q, "from", now)
        end = self._time(q, "to", now)
        if start is not None and end is not None and start > end:
            raise bad("from", "must not be after to")
        agg = q.get("agg", "mean")
        if agg not in AGGREGATES:
            raise bad("agg", f"must be one of {', '.join(AGGREGATES)}, not {agg!r}")
        try:
            points_wanted = int(q.get("points", str(AUTO_POINTS)))
        except ValueError:
            raise bad("points", "must be an integer from 1 to 5000") from None
        if not 1 <= points_wanted <= 5000:
            raise bad("points", "must be an integer from 1 to 5000")
        return device, metric, start, end, agg, points_wanted

    @staticmethod
    def _time(query: Any, name: str, now: datetime) -> datetime | None:
        text = query.get(name)
        if text is None or text == "":
            return None
        try:
            value = parse_time(text, now)
            value.timestamp()
        except (ValueError, OverflowError, OSError) as exc:
            raise bad(name, str(exc)) from None
        if not datetime(1970, 1, 1, tzinfo=UTC) <= value <= datetime(9999, 1, 1, tzinfo=UTC):
            raise bad(name, "must be between 1970 and 9999")
        return value

    async def _alerts(self, request: web.Request) -> web.Response:
        try:
            limit = int(request.query.get("limit", "50"))
        except ValueError:
            raise bad("limit", "must be an integer from 1 to 1000") from None
        if not 1 <= limit <= 1000:
            raise bad("limit", "must be an integer from 1 to 1000")
        return json_response(m.Alerts(active=[_alert_out(a) for a in self.alerts.active()],
                              recent=[_alert_out(a) for a in self.alerts.recent(limit)]))

    async def _catalog(self, request: web.Request) -> web.Response:
        return json_response(m.Catalog(types=[
            m.EventTypeOut.model_validate({"type": t.type, "description": t.description, "topic": t.topic,
                                           "schema": t.schema, "producers": list(t.producers),
                                           "consumers": list(t.consumers)})
            for t in self.catalog.types()
        ]))

    async def _asyncapi(self, request: web.Request) -> web.Response:
        document = self.catalog.asyncapi()
        if self.portal is not None:
            document = self.portal.asyncapi(document)
        return web.json_response(document)

    async def _stats(self, request: web.Request) -> web.Response:
        return json_response(self._status())

