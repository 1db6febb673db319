"""The ``iotgw`` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.config import StorageSettings, load_config
from gateway.errors import ConfigError, GatewayError
from gateway.query import (
    QueryError,
    iso_ms,
    parse_duration,
    query_series,
    render_points,
)
from gateway.service import Gateway
from pipeline.errors import PipelineError
from pipeline.store import StoreReader

log = logging.getLogger("iotgw")
EXIT_USAGE = 2
DEFAULT_DATA_DIR = StorageSettings().data_dir


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",  # journald adds the time
        stream=sys.stderr,
    )
    for noisy in ("amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.ERROR)


async def _serve(make: Callable[[], AbstractAsyncContextManager[Gateway]], seconds: float | None,
                 report: Callable[[Gateway], None] | None = None) -> Gateway:
    """Run until ``seconds`` pass, SIGINT or SIGTERM; then stop cleanly (flushed)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with make() as gateway:
            if report is not None:
                report(gateway)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), seconds)
            log.info("stopping: flushing what was accepted")
        return gateway
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _print_stats(stats: dict[str, Any], seconds: float) -> None:
    out = sys.stdout
    print(f"iotgw: ran {seconds:.1f} s", file=out)
    drivers = stats["drivers"]
    for name, d in drivers.items():
        extra = "".join(f" {k}={v}" for k, v in {**d["errors"], **d["skipped"]}.items())
        print(f"  driver {name:<14} frames={d['frames']} readings={d['readings']}{extra}", file=out)
    print(f"  broker tapped={stats['broker']['tapped']} queue_high_water={stats['queue']['high_water']}"
          f" producer_waits={stats['queue']['producer_waits']}", file=out)
    sessions, offences = stats["broker"]["sessions"], stats["broker"]["offences"]
    bad = " ".join(f"{k}={v}" for k, v in offences.items()) or "none"
    print(f"  mqtt sessions={sessions['clients']} persistent={sessions['persistent']} queued={sessions['queued']}"
          f" dropped={sum(sessions['dropped'].values())} closed for bad input: {bad}", file=out)
    for name, s in stats["stages"].items():
        rejected = " ".join(f"{k}={v}" for k, v in s["rejected"].items())
        print(f"  {name:<8} in={s['in']:<7} out={s['out']:<7} rejected: {rejected or 'none'}", file=out)
    for name, f in stats["forward"].get("destinations", {}).items():
        print(f"  forward {name:<12} delivered={f['delivered']} depth={f['depth']} bytes={f['bytes']}"
              f" dropped={f['dropped']} refused_waits={f['refused_waits']} oldest_age_s={f['oldest_age_s']}"
              f" connected={f['connected']}", file=out)
    journal = stats["journal"]
    print(f"  journal appended={journal['appended']} replayed={journal['replayed']}"
          f" resends_recognised={journal['resends_recognised']} commits={journal['commits']}", file=out)
    print(f"  read={stats['stages']['collect']['in']} stored={stats['stored']} "
          f"rejected={stats['published']['rejects']} events_published={stats['published']['events']}", file=out)


def _run_gateway(make: Callable[[], AbstractAsyncContextManager[Gateway]], seconds: float | None,
                 announce: Callable[[Gateway], None]) -> int:
    started = datetime.now(UTC)
    try:
        gateway = asyncio.run(_serve(make, seconds, announce))
    except (GatewayError, PipelineError) as exc:
        print(f"iotgw: error: {exc}", file=sys.stderr)
        return 1
    _print_stats(gateway.stats(), (datetime.now(UTC) - started).total_seconds())
    return 0 if not gateway.undrained else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import (  # the simulators load only for the demo
        demo_config,
        demo_gateway,
    )

    config = demo_config(args.data_dir, args.mqtt_port)

    def announce(gw: Gateway) -> None:
        print(f"iotgw demo: MQTT broker on {config.broker.host}:{gw.broker.port}, data in {config.storage.data_dir}"
              f"\n  watch:  mosquitto_sub -p {gw.broker.port} -t 'telemetry/#' -v", flush=True)

    return _run_gateway(lambda: demo_gateway(config), args.seconds, announce)


def cmd_run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config).with_overrides(data_dir=args.data_dir, mqtt_port=args.mqtt_port)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE

    def announce(gw: Gateway) -> None:
        print(f"iotgw: MQTT broker on {config.broker.host}:{gw.broker.port}, data in {config.storage.data_dir}",
              flush=True)

    return _run_gateway(lambda: Gateway(config, port_option="--mqtt-port or [broker] port"), args.seconds, announce)


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        return EXIT_USAGE
    print(f"{args.file}: valid ({len(config.devices)} device(s))")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    with StoreReader(args.data_dir) as store:
        rows = store.devices()
    records = [
        {
            "device_id": r.device_id, "transport": r.transport, "device_class": r.device_class, "site": r.site,
            "first_seen": iso_ms(r.first_seen_ms), "last_seen": iso_ms(r.last_seen_ms), "metrics": list(r.metrics),
        }
        for r in rows
    ]
    if args.format == "json":
        json.dump(records, sys.stdout, indent=2)
        print()
        return 0
    header = ("DEVICE", "TRANSPORT", "CLASS", "LAST SEEN", "METRICS")
    table = [(r.device_id, r.transport, r.device_class, iso_ms(r.last_seen_ms), ",".join(r.metrics)) for r in rows]
    _print_table(header, table)
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    with StoreReader(args.data_dir) as store:
        points = query_series(store, args.device, args.metric, since=args.since, every=args.every, agg=args.agg)
    sys.stdout.write(render_points(points, args.format))
    return 0


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    for row in (header, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iotgw", description="IoT edge gateway")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def data_dir(p: argparse.ArgumentParser, default: Path | None) -> None:
        p.add_argument("--data-dir", type=Path, default=default,
                       help=f"where the store lives (default: {DEFAULT_DATA_DIR})")

    p = sub.add_parser("demo", help="broker, simulated fleet, pipeline and store on embedded defaults")
    p.add_argument("--seconds", type=float, default=None, help="stop after N seconds (default: until Ctrl-C)")
    data_dir(p, DEFAULT_DATA_DIR)
    p.add_argument("--mqtt-port", type=int, default=1883, help="embedded broker port (default: 1883)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="run the gateway from a TOML config file")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--seconds", type=float, default=None, help="stop after N seconds (default: until stopped)")
    data_dir(p, None)
    p.add_argument("--mqtt-port", type=int, default=None, help="overrides [broker] port")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", help="validate a config file: exit 0, or 2 with one line per problem")
    p.add_argument("file", type=Path)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("devices", help="devices seen, from the store")
    data_dir(p, DEFAULT_DATA_DIR)
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("query", help="one series from the store")
    data_dir(p, DEFAULT_DATA_DIR)
    p.add_argument("--device", required=True)
    p.add_argument("--metric", required=True)
    p.add_argument("--since", type=parse_duration, default=None, help="e.g. 90s, 15m, 2h, 7d")
    p.add_argument("--every", type=parse_duration, default=None, help="downsample into buckets, e.g. 1m")
    p.add_argument("--agg", choices=("mean", "min", "max", "last", "count"), default="mean")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.set_defaults(func=cmd_query)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        result: int = args.func(args)
    except (QueryError, PipelineError, GatewayError) as exc:
        print(f"iotgw: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `iotgw query ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return result
