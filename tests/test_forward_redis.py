"""Forwarding to Redis Streams: Debian's redis-server on a free loopback port (AOF, fsync always).

Stream names from the taxonomy, trimming, the id set that keeps an event from being added twice
(across gateway restarts too), an outage, ``kill -9`` of the gateway, and what readers do: a consumer
group reading and acknowledging entries, as the README describes.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from conftest import until, wait_for
from gatewayproc import Device, RunningGateway, crash_config, crash_load, kill_9_under_load
from peers import RedisServer, free_port, redis_server_fixture  # noqa: F401  (pytest fixture)
from test_forward import _dest, devices, gateway_config  # noqa: F401  (a fixture)

from gateway.app import Gateway
from gateway.config import ConfigError, parse_config
from gateway.forward.base import DestinationUnavailableError, OutboundEvent
from gateway.forward.redis.destination import RedisDestination, RedisSettings
from gateway.forward.redis.streams import StreamNames
from pipeline.topics import DEFAULT_TEMPLATE, TopicTemplate

TAXONOMY = TopicTemplate(DEFAULT_TEMPLATE)


@pytest.mark.parametrize(("template", "topic", "stream"), [
    ("iotgw:{stage}", "telemetry/valid/1.0/s1/air/co2-1/co2", "iotgw:valid"),
    ("iotgw:{stage}", "alert/raised/1.0/s1/air/co2-1/co2", "iotgw:alert"),  # outside the taxonomy: level 0
    ("iotgw:{stage}", "cmdack/s1/valve-1/open", "iotgw:cmdack"),
    ("{site}:{device_class}:{stage}", "telemetry/agg/1.0/s1/air/co2-1/co2", "s1:air:agg"),
    ("{site}:{device_id}", "cmdack/s1/valve-1/open", "_:_"),  # no taxonomy fields outside it
    ("gw:{level0}:{level3}:{level9}", "cmdack/s1/valve-1/open", "gw:cmdack:open:_"),
], ids=["stage", "alert", "cmdack", "fields", "fields-outside", "levels"])
def test_stream_names_come_from_the_taxonomy(template: str, topic: str, stream: str) -> None:
    assert StreamNames(template, TAXONOMY)(topic) == stream


@pytest.mark.parametrize(("extra", "problem"), [
    ({"stream": "iotgw:{sitee}"}, "unknown placeholder"),
    ({"stream": "iotgw:{stage!r}"}, "unknown placeholder"),
    ({"subscribe": ["cmd/#"]}, "receives nothing"),
    ({"url": "http://redis:6379"}, "redis://"),
    ({"maxlen": 0}, "maxlen"),
], ids=["placeholder", "conversion", "subscribe", "scheme", "maxlen"])
def test_settings_refuse_what_cannot_work(extra: dict[str, Any], problem: str) -> None:
    forward = {"name": "rs", "type": "redis", "url": "redis://redis:6379/0", "topics": ["telemetry/#"], **extra}
    with pytest.raises(ConfigError, match=problem):
        parse_config({"forward": [forward]})


def _event(i: int, device: str = "d-1", stage: str = "valid") -> OutboundEvent:
    body = {"specversion": "1.0", "id": f"01J{i:023d}", "type": "t.v1", "data": {"device_id": device, "seq": i}}
    return OutboundEvent(i, f"01J{i:023d}", f"telemetry/{stage}/1.0/s/c/{device}/m", device,
                         json.dumps(body).encode(), 1_700_000_000_000)


def _settings(server: RedisServer, **kw: Any) -> RedisSettings:
    return RedisSettings(url=f"redis://127.0.0.1:{server.port}/0", gateway_id="gw",
                         streams=StreamNames(kw.pop("stream", "iotgw:{stage}"), TAXONOMY), **kw)


async def _connected(destination: RedisDestination) -> RedisDestination:
    await destination.start()
    await until(lambda: destination.connected, 15, "connect")
    return destination


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis(port=redis_server.port)
    yield c
    await c.aclose()


async def _entries(client: aioredis.Redis, stream: str) -> list[dict[str, str]]:
    entries = await client.xrange(stream) or []
    return [{_text(k): _text(v) for k, v in (fields or {}).items()} for _, fields in entries]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def test_each_event_is_an_entry_with_its_id_and_is_added_once_across_restarts(
    redis_server: RedisServer, client: aioredis.Redis
) -> None:
    events = [_event(i) for i in range(1, 21)] + [_event(21, stage="agg")]
    first = await _connected(RedisDestination("rs", _settings(redis_server)))
    try:
        assert await first.send(events[:10]) == 10
        assert await first.send(events[5:10]) == 5  # a retry after a timeout, say
        assert first.duplicates == 5
    finally:
        await first.close()
    second = await _connected(RedisDestination("rs", _settings(redis_server)))  # a gateway restart
    try:
        assert await second.send(events) == 21
        assert second.duplicates == 10
    finally:
        await second.close()
    valid = await _entries(client, "iotgw:valid")
    assert [e["event_id"] for e in valid] == [e.event_id for e in events[:20]]
    assert valid[0] == {"event_id": events[0].event_id, "topic": events[0].topic, "gateway": "gw",
                        "payload": events[0].payload.decode()}
    assert [e["event_id"] for e in await _entries(client, "iotgw:agg")] == [events[20].event_id]


@pytest.mark.parametrize("approximate", [True, False], ids=["approximate", "exact"])
async def test_streams_are_trimmed_and_so_is_their_id_set(
    redis_server: RedisServer, client: aioredis.Redis, approximate: bool
) -> None:
    destination = await _connected(RedisDestination("rs", _settings(redis_server, maxlen=200,
                                                                     approximate=approximate)))
    try:
        for start in range(1, 3001, 500):
            assert await destination.send([_event(i) for i in range(start, start + 500)]) == 500
    finally:
        await destination.close()
    length, ids = await client.xlen("iotgw:valid"), await client.zcard("iotgw:valid:ids")
    if approximate:
        assert 200 <= length < 1000  # whole macro nodes (100 entries each by default) go
    else:
        assert length == 200
    assert 200 <= ids <= 300  # the newest 200 ids, trimmed in slices of at least 100
    newest = await client.zrange("iotgw:valid:ids", -1, -1)
    assert newest == [_event(3000).event_id.encode()]


async def test_a_server_that_lost_its_scripts_is_reloaded(redis_server: RedisServer, client: aioredis.Redis) -> None:
    destination = await _connected(RedisDestination("rs", _settings(redis_server)))
    try:
        assert await destination.send([_event(1)]) == 1
        await client.script_flush()  # what a restart without persistence of the script cache does
        with pytest.raises(DestinationUnavailableError):
            await destination.send([_event(2)])
        await until(lambda: destination.connected, 15, "the script to be loaded again")
        assert await destination.send([_event(2)]) == 1
    finally:
        await destination.close()
    assert await client.xlen("iotgw:valid") == 2


def _seqs(entries: list[dict[str, str]]) -> dict[str, list[tuple[int, str]]]:
    out: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for entry in entries:
        data = json.loads(entry["payload"])["data"]
        out[data["device_id"]].append((data["seq"], entry["event_id"]))
    return out


def _assert_once_in_order(entries: list[dict[str, str]], acked: dict[str, list[int]], *, device_order: bool = True
                          ) -> None:
    ids = [e["event_id"] for e in entries]
    assert len(ids) == len(set(ids)), "an event id twice"
    by_device = _seqs(entries)
    for device, want in acked.items():
        got = [seq for seq, _ in by_device[device]]
        event_ids = [eid for _, eid in by_device[device]]
        assert event_ids == sorted(event_ids), f"{device}: not in the order the gateway accepted them"
        if device_order:
            assert got == sorted(got), f"{device}: out of order"
        missing = sorted(set(want) - set(got))
        assert not missing, f"{device}: {len(missing)} acknowledged readings missing: {missing[:10]}"


async def test_outage_loses_nothing_and_keeps_order(
    tmp_path: Path, redis_server: RedisServer, client: aioredis.Redis, devices: list[Device]  # noqa: F811
) -> None:
    config = gateway_config(tmp_path, [{
        "name": "rs", "type": "redis", "url": f"redis://127.0.0.1:{redis_server.port}/0",
        "topics": ["telemetry/valid/>"], "stream": "iotgw:{stage}:{site}",
    }])
    async with Gateway(config) as gw:
        def rs() -> dict[str, Any]:
            return _dest(gw, "rs")
        await until(lambda: rs()["connected"], 15, "connect")
        devices += [Device(gw.broker.port, f"r-{i}", rate_hz=20).start() for i in (1, 2)]
        await asyncio.sleep(3)
        await asyncio.to_thread(redis_server.stop)
        await asyncio.sleep(10)
        during = rs()
        assert not during["connected"]
        assert during["depth"] > 200
        await asyncio.to_thread(redis_server.restart)
        await asyncio.sleep(3)
        for device in devices:
            device.stop()
        await until(lambda: rs()["depth"] == 0, 60, "the outbox to drain")
    entries = await _entries(client, "iotgw:valid:s1")
    _assert_once_in_order(entries, {d.device_id: d.acked() for d in devices})
    assert len(_seqs(entries)["r-1"]) > 300


def test_kill_9_of_the_gateway_twice_loses_nothing_and_adds_each_event_once(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    port = free_port()
    config = crash_config(tmp_path / "gw.toml", port, f'name = "rs"\ntype = "redis"\n'
                          f'url = "redis://127.0.0.1:{redis_server.port}/0"\ntopics = ["telemetry/valid/#"]\n')
    gateway = RunningGateway(config, mqtt_port=port)
    load: list[Device] = []
    entries: list[dict[str, str]] = []

    async def read() -> list[dict[str, str]]:
        r = aioredis.Redis(port=redis_server.port)
        try:
            return await _entries(r, "iotgw:valid")
        finally:
            await r.aclose()

    try:
        load += crash_load(port)
        acked = kill_9_under_load(gateway, load, kills=2, run_s=3, away_s=0.5, settle_s=3, resend_s=3)
        assert sum(len(a) for a in acked.values()) > 500

        def delivered() -> bool:
            entries[:] = asyncio.run(read())
            got = _seqs(entries)
            return all(set(acked[d]) <= {s for s, _ in got[d]} for d in acked)

        wait_for(delivered, 90, interval=0.5, fail=False)
    finally:
        for d in load:
            d.close()
        gateway.stop(30)
    _assert_once_in_order(entries, acked, device_order=False)


async def test_readers_share_a_stream_through_a_consumer_group(
    redis_server: RedisServer, client: aioredis.Redis
) -> None:
    """What the README tells readers to do: XGROUP CREATE once, XREADGROUP, XACK; two consumers of one
    group split the entries, and what one never acknowledged can be claimed by the other."""
    destination = await _connected(RedisDestination("rs", _settings(redis_server)))
    try:
        assert await destination.send([_event(i) for i in range(1, 11)]) == 10
    finally:
        await destination.close()
    await client.xgroup_create("iotgw:valid", "billing", id="0", mkstream=True)
    first = await client.xreadgroup("billing", "reader-1", {"iotgw:valid": ">"}, count=6)
    second = await client.xreadgroup("billing", "reader-2", {"iotgw:valid": ">"}, count=10)
    taken = [entry for _, entries in (*first, *second) for entry in entries]
    assert len(taken) == 10
    assert len({fields[b"event_id"] for _, fields in taken}) == 10
    await client.xack("iotgw:valid", "billing", *[entry_id for entry_id, _ in taken[:6]])
    claimed = await client.xautoclaim("iotgw:valid", "billing", "reader-1", min_idle_time=0, start_id="0")
    assert len(claimed[1]) == 4  # reader-2's unacknowledged entries


async def test_an_event_redis_refuses_is_not_marked_as_added(redis_server: RedisServer, client: aioredis.Redis) -> None:
    """XADD fails (the key holds a string): the event stays unsent, its id is not kept, and once the key
    is fixed the same batch goes through with nothing lost and nothing twice."""
    await client.set("iotgw:agg", "not a stream")
    batch = [_event(1), _event(2, stage="agg"), _event(3)]
    destination = await _connected(RedisDestination("rs", _settings(redis_server)))
    try:
        with pytest.raises(DestinationUnavailableError, match="WRONGTYPE"):
            await destination.send(batch)  # one script call: the whole batch is unacknowledged
        assert await client.zrange("iotgw:agg:ids", 0, -1) == []
        await client.delete("iotgw:agg")
        assert await destination.send(batch) == 3
        assert destination.duplicates == 1  # event 1 got in before the refusal
    finally:
        await destination.close()
    assert [e["event_id"] for e in await _entries(client, "iotgw:valid")] == [batch[0].event_id, batch[2].event_id]
    assert [e["event_id"] for e in await _entries(client, "iotgw:agg")] == [batch[1].event_id]
