"""The ``iotgw`` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

from firmware_sim.pty import SocatError
from gateway.broker.auth import DEFAULT_ITERATIONS, AuthError, BrokerSecurity, hash_password, update_password_file
from gateway.cli.serve import DEMO_HTTP_PORT, EXIT_USAGE, cmd_demo, cmd_run
from gateway.config import DEFAULT_METRIC_RULES, GatewayConfig, StorageSettings, load_config, parse_config
from gateway.errors import ConfigError, GatewayError
from gateway.ops.logs import setup_logging
from gateway.ops.systemd import SERVICE_USER, MissingToolError, default_executable, install
from gateway.portal import with_applications
from gateway.portal.define import DEMO_PORTAL_FILE
from gateway.query import (
    QueryError,
    iso_ms,
    parse_duration,
    query_series,
    render_points,
)
from pipeline.asyncapi import asyncapi_document, consumers_json, producers_json, traffic_by_type
from pipeline.catalog import Catalog
from pipeline.errors import PipelineError
from pipeline.store import StoreReader
from pipeline.topics import TopicTemplate
from pipeline.traffic import read_traffic

log = logging.getLogger("iotgw")
DEFAULT_DATA_DIR = StorageSettings().data_dir














def cmd_sim(args: argparse.Namespace) -> int:
    from firmware_sim.fleet import (  # noqa: PLC0415  the simulators load only for this command
        Fleet,
        FleetError,
        gateway_fragment,
        load_fleet,
    )

    try:
        spec = load_fleet(args.fleet)
    except FleetError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE
    fleet = Fleet(spec, spec.env(args.dir.resolve()))
    if args.gateway_config is not None:
        ranges = {k: (r.min, r.max) for k, r in DEFAULT_METRIC_RULES.items()
                  if r.min is not None and r.max is not None}
        args.gateway_config.write_text(gateway_fragment(fleet, ranges), encoding="utf-8")
        print(f"iotgw sim: gateway config written to {args.gateway_config}", flush=True)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with fleet:
            for device in fleet.gateway_devices():
                where = device.get("port") or f"mqtt {spec.mqtt_host}:{spec.mqtt_port}"
                print(f"  {device['id']:<16} {device['transport']:<7} {where}", flush=True)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(args.seconds):
                    await stop.wait()

    try:
        asyncio.run(serve())
    except SocatError as exc:  # e.g. unplug_every without socat: one line, no traceback
        print(f"iotgw: error: {exc}", file=sys.stderr)
        return 1
    print("iotgw sim: faults injected", file=sys.stdout)
    for device_id, faults in fleet.faults().items():
        counts = " ".join(f"{k}={v}" for k, v in sorted(faults.items())) or "none"
        print(f"  {device_id:<16} {counts}")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        return EXIT_USAGE
    try:
        BrokerSecurity(config.broker)  # the password file and the anonymous rule
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        return EXIT_USAGE
    print(f"{args.file}: valid ({len(config.devices)} device(s))")
    return 0


def cmd_passwd(args: argparse.Namespace) -> int:
    try:
        if args.delete:
            update_password_file(args.file, args.user, None)
            print(f"{args.file}: user {args.user!r} deleted", file=sys.stderr)
            return 0
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = getpass.getpass(f"Password for {args.user}: ")
            if getpass.getpass("Again: ") != password:
                print("iotgw: error: the passwords differ; nothing changed", file=sys.stderr)
                return 1
        if not password:
            print("iotgw: error: an empty password is not allowed", file=sys.stderr)
            return 1
        update_password_file(args.file, args.user, hash_password(password, iterations=args.iterations))
    except (AuthError, OSError) as exc:
        print(f"iotgw: error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.file}: password set for {args.user!r}", file=sys.stderr)
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    with StoreReader(args.data_dir) as store:
        rows = store.devices()
    records: list[dict[str, Any]] = [
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


def cmd_service_install(args: argparse.Namespace) -> int:
    example = files("gateway").joinpath("sample-config.toml").read_text(encoding="utf-8")
    root: Path = args.root
    try:
        done = install(unit_dir=args.unit_dir or root / "etc/systemd/system",
                       config_dir=args.config_dir or root / "etc/iotgw",
                       executable=args.executable or default_executable(), example_config=example,
                       reload=not args.no_reload, root=root)
    except MissingToolError as exc:
        print(f"iotgw: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"iotgw: error: cannot install the service: {exc} (run it as root?)", file=sys.stderr)
        return 1
    print(f"installed {done.unit}; the service runs as the system user {SERVICE_USER} (gid {done.group})")
    print(f"{'wrote the example config' if done.config_written else 'kept the existing config'} {done.config}")
    for path in done.secured:
        print(f"made {path} readable by group {SERVICE_USER} only")
    if not done.reloaded:
        print("systemd did not reload its units (not running, or --no-reload): systemctl daemon-reload")
    print(f"next: edit {done.config}, then: iotgw check-config {done.config} && systemctl enable --now iotgw")
    return 0


def _field_text(f: dict[str, Any]) -> str:
    return f"{f['name']}{'' if f['required'] else '?'}:{f['type']}" + (f" [{f['unit']}]" if f["unit"] else "")


def cmd_catalog(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config) if args.config else GatewayConfig()
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE
    config = config.with_overrides(data_dir=args.data_dir)
    demo_portal = config.storage.data_dir / DEMO_PORTAL_FILE
    if not args.config and demo_portal.exists():  # what `iotgw demo`'s portal defined
        try:
            config = parse_config({"storage": {"data_dir": str(config.storage.data_dir)},
                                   "catalog": {"portal_file": str(demo_portal)}})
        except ConfigError as exc:
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            return EXIT_USAGE
    catalog = Catalog(TopicTemplate(config.topics.template), config.catalog.all_types, strict=config.catalog.strict)
    producers, consumers = read_traffic(config.storage.data_dir)
    if args.format == "asyncapi":
        document = asyncapi_document(catalog, host=config.broker.host, port=config.broker.port, site=config.site,
                                     producers=producers, consumers=consumers)
        document = with_applications(document, config.catalog, catalog, producers, consumers)
        json.dump(document, sys.stdout, indent=2, ensure_ascii=False)
        print()
        return 0
    traffic = traffic_by_type(catalog, producers, consumers)
    records: list[dict[str, Any]] = [
        {
            "name": t.name, "version": t.version, "variant": t.variant, "key": t.key, "description": t.description,
            "topic": str(t.pattern), "builtin": t.builtin, "device_classes": list(t.device_classes),
            "metric": t.metric, "fields": t.schema_fields(),
            "producers": producers_json(traffic[t.key][0]), "consumers": consumers_json(traffic[t.key][1]),
        }
        for t in catalog.types
    ]
    if args.format == "json":
        json.dump(records, sys.stdout, indent=2, ensure_ascii=False)
        print()
        return 0
    header = ("TYPE", "VERSION", "TOPIC", "FIELDS", "PRODUCERS", "CONSUMERS")
    table = [
        (r["name"] + (f" ({r['variant']})" if r["variant"] else ""), r["version"], r["topic"],
         ", ".join(_field_text(f) for f in r["fields"]),
         ", ".join(f"{p['client']} ({p['messages']})" for p in r["producers"]) or "-",
         ", ".join(f"{c['client']} ({c['filter']})" for c in r["consumers"]) or "-")
        for r in records
    ]
    _print_table(header, table)
    return 0


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    for row in (header, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())


def _add_sim_command(sub: Any) -> None:
    p = sub.add_parser("sim", help="run a fleet of simulated devices described in TOML (until Ctrl-C)")
    p.add_argument("--fleet", type=Path, required=True, help="the fleet file ([[device]] kind, id, faults)")
    p.add_argument("--dir", type=Path, default=Path("iotgw-sim"), help="where serial links go (default: iotgw-sim)")
    p.add_argument("--gateway-config", type=Path, default=None, help="write a matching gateway config fragment")
    p.add_argument("--seconds", type=float, default=None, help="stop after N seconds (default: until Ctrl-C)")
    p.set_defaults(func=cmd_sim)


def _add_service_command(sub: Any) -> None:
    p = sub.add_parser("service", help="run under systemd")
    service = p.add_subparsers(dest="action", required=True)
    p = service.add_parser("install", help="install the systemd unit, its user and an example config (as root)")
    p.add_argument("--root", type=Path, default=Path("/"),
                   help="install into the system image at this directory (default: /, the running system)")
    p.add_argument("--unit-dir", type=Path, default=None, help="default: ROOT/etc/systemd/system")
    p.add_argument("--config-dir", type=Path, default=None, help="default: ROOT/etc/iotgw")
    p.add_argument("--executable", default=None, help="the iotgw the unit runs (default: this one)")
    p.add_argument("--no-reload", action="store_true", help="do not run systemctl daemon-reload")
    p.set_defaults(func=cmd_service_install)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iotgw", description="IoT edge gateway")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--log-format", choices=("text", "json"), default=None,
                        help="text (journald-friendly, the default) or JSON lines; overrides [logging] format")
    sub = parser.add_subparsers(dest="command", required=True)

    def data_dir(p: argparse.ArgumentParser, default: Path | None) -> None:
        p.add_argument("--data-dir", type=Path, default=default,
                       help=f"where the store lives (default: {DEFAULT_DATA_DIR})")

    p = sub.add_parser("demo", help="broker, simulated fleet, pipeline and store on embedded defaults")
    p.add_argument("--seconds", type=float, default=None, help="stop after N seconds (default: until Ctrl-C)")
    data_dir(p, DEFAULT_DATA_DIR)
    p.add_argument("--mqtt-port", type=int, default=1883, help="embedded broker port (default: 1883)")
    p.add_argument("--http-port", type=int, default=None,
                   help=f"dashboard and HTTP API port (default: {DEMO_HTTP_PORT}, or any free one if taken; 0: any)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="run the gateway from a TOML config file")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--seconds", type=float, default=None, help="stop after N seconds (default: until stopped)")
    data_dir(p, None)
    p.add_argument("--mqtt-port", type=int, default=None, help="overrides [broker] port")
    p.add_argument("--http-port", type=int, default=None, help="serve the dashboard and HTTP API on this port "
                   "(overrides [http] port and turns [http] on; 0: any free port)")
    p.set_defaults(func=cmd_run)

    _add_service_command(sub)

    _add_sim_command(sub)

    p = sub.add_parser("check-config", help="validate a config file: exit 0, or 2 with one line per problem")
    p.add_argument("file", type=Path)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("passwd", help="set (or with -D delete) a broker user's password in a password file")
    p.add_argument("file", type=Path, help="the [broker] password_file (created if missing: mode 0600, or 0640 "
                   "in a setgid directory such as the service's /etc/iotgw; kept as it was when it exists)")
    p.add_argument("user")
    p.add_argument("-D", "--delete", action="store_true", help="delete the user")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin (one line)")
    p.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS,
                   help=f"PBKDF2-SHA512 iterations (default: {DEFAULT_ITERATIONS})")
    p.set_defaults(func=cmd_passwd)

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

    p = sub.add_parser("catalog", help="event types with their schema, producers and consumers; AsyncAPI 3.0")
    p.add_argument("--config", type=Path, default=None, help="the gateway's config file (default: built-ins only)")
    data_dir(p, None)
    p.add_argument("--format", choices=("table", "json", "asyncapi"), default="table")
    p.set_defaults(func=cmd_catalog)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(verbose=args.verbose, fmt=args.log_format or "text")
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
