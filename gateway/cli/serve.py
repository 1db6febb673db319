"""The commands that run a gateway: ``iotgw run`` (from a configuration file) and ``iotgw demo``
(simulated devices). They build the composition root (:mod:`gateway.app`), serve until told to stop
(SIGINT/SIGTERM, or ``--seconds``), reload on SIGHUP, and print the gateway's status when it stops."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime

from firmware_sim.pty import SocatError
from gateway.app import Gateway
from gateway.broker.auth import BrokerSecurity
from gateway.config import HttpSettings, load_config
from gateway.errors import ConfigError, GatewayError
from gateway.ops.logs import redact, secret_values, setup_logging
from gateway.ops.systemd import Notifier, notifying
from gateway.status import GatewayStatus
from pipeline.errors import PipelineError
from pipeline.retry import stop_task

log = logging.getLogger("iotgw")
EXIT_USAGE = 2
DEMO_HTTP_PORT = HttpSettings().port


Reloader = Callable[[Gateway], Awaitable[None]]


async def _serve(make: Callable[[], AbstractAsyncContextManager[Gateway]], seconds: float | None,
                 report: Callable[[Gateway], None] | None = None, reload: Reloader | None = None) -> Gateway:
    """Run until ``seconds`` pass, SIGINT or SIGTERM; then stop cleanly (flushed). SIGHUP reloads."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    hup = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, hup.set)
    notifier = Notifier()

    async def reloads(gateway: Gateway) -> None:
        while True:
            await hup.wait()
            hup.clear()
            if reload is None:
                log.warning("SIGHUP: nothing to reload (no configuration file)")
                continue
            notifier.notify(RELOADING=1, STATUS="reloading the configuration")
            try:
                await reload(gateway)
            except Exception:
                log.exception("reload failed; the gateway runs on")
            notifier.notify(READY=1, STATUS=gateway.health().status)

    try:
        async with make() as gateway, notifying(notifier, gateway.health):
            if report is not None:
                report(gateway)
            reloader = asyncio.create_task(reloads(gateway), name="reload")
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(seconds):
                        await stop.wait()
            finally:
                await stop_task(reloader)
            log.info("stopping: flushing what was accepted")
        return gateway
    finally:
        notifier.close()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)


def _print_stats(status: GatewayStatus, seconds: float) -> None:
    out = sys.stdout
    print(f"iotgw: ran {seconds:.1f} s", file=out)
    for name, d in status.drivers.items():
        extra = "".join(f" {k}={v}" for k, v in {**d.errors, **d.skipped, **d.anomalies}.items())
        extra += f" disconnects={d.disconnects}" if d.disconnects else ""
        print(f"  driver {name:<14} frames={d.frames} readings={d.readings}{extra}", file=out)
    broker, queue = status.broker, status.queue
    print(f"  broker tapped={broker.tapped} queue_high_water={queue.high_water}"
          f" producer_waits={queue.producer_waits}", file=out)
    if security := broker.security:
        denied = " ".join(f"{k}={v}" for k, v in security.denied.items())
        print(f"  broker logins_accepted={security.logins_accepted} logins_refused={security.logins_refused}"
              f" denied: {denied}", file=out)
    if (external := broker.external) is not None:
        print(f"  external broker {external.url} received={external.received} acknowledged={external.acknowledged}"
              f" retained_skipped={external.retained_skipped} published={external.published}"
              f" publish_failures={external.publish_failures} disconnects={external.disconnects}", file=out)
    else:
        sessions = broker.sessions
        bad = " ".join(f"{k}={v}" for k, v in broker.offences.items()) or "none"
        print(f"  mqtt sessions={sessions.clients} persistent={sessions.persistent} queued={sessions.queued}"
              f" dropped={sessions.dropped_total} retained={broker.retained.messages}"
              f" closed for bad input: {bad}", file=out)
        hits = " ".join(f"{k}={v}" for k, v in broker.limits.model_dump().items() if v)
        if hits:
            print(f"  mqtt bounds hit: {hits}", file=out)
    for name, s in status.stages.items():
        rejected = " ".join(f"{k}={v}" for k, v in s.rejected.items())
        print(f"  {name:<8} in={s.in_:<7} out={s.out:<7} rejected: {rejected or 'none'}", file=out)
    for name, f in status.forward.destinations.items():
        print(f"  forward {name:<12} delivered={f.delivered} depth={f.depth} bytes={f.bytes}"
              f" dropped={f.dropped} refused_waits={f.refused_waits} oldest_age_s={f.oldest_age_s}"
              f" connected={f.connected}" + (f"\n    error: {f.error}" if f.error else ""), file=out)
    journal = status.journal
    print(f"  journal appended={journal.appended} replayed={journal.replayed}"
          f" resends_recognised={journal.resends_recognised} commits={journal.commits}", file=out)
    collect = status.stages.get("collect")
    print(f"  read={collect.in_ if collect else 0} stored={status.stored} "
          f"rejected={status.published.rejects} events_published={status.published.events}", file=out)


def _run_gateway(make: Callable[[], AbstractAsyncContextManager[Gateway]], seconds: float | None,
                 announce: Callable[[Gateway], None], reload: Reloader | None = None) -> int:
    started = datetime.now(UTC)
    try:
        gateway = asyncio.run(_serve(make, seconds, announce, reload))
    except (GatewayError, PipelineError) as exc:
        print(f"iotgw: error: {exc}", file=sys.stderr)
        return 1
    status = gateway.status()
    _print_stats(status, (datetime.now(UTC) - started).total_seconds())
    return 0 if not status.undrained else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.cli.demo import (  # noqa: PLC0415  the simulators load only for the demo
        demo_config,
        demo_gateway,
    )

    try:
        config = demo_config(args.data_dir, args.mqtt_port).with_overrides(
            http_port=DEMO_HTTP_PORT if args.http_port is None else args.http_port)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE

    def announce(gw: Gateway) -> None:
        print(f"iotgw demo: MQTT broker on {config.broker.host}:{gw.broker.port}, data in {config.storage.data_dir}"
              f"\n  dashboard: {gw.http.url if gw.http else '(off)'}"
              f"\n  watch:  mosquitto_sub -p {gw.broker.port} -t 'telemetry/#' -v", flush=True)

    try:  # without --http-port the demo takes any free port when 8080 is taken (it prints which)
        return _run_gateway(lambda: demo_gateway(config, http_any_port_if_taken=args.http_port is None),
                            args.seconds, announce)
    except SocatError as exc:  # a simulated cable could not be made: one line, no traceback
        print(f"iotgw: error: {exc}", file=sys.stderr)
        return 1


def cmd_run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config).with_overrides(data_dir=args.data_dir, mqtt_port=args.mqtt_port,
                                                         http_port=args.http_port)
        BrokerSecurity(config.broker)  # before anything starts: the password file and the anonymous rule
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE
    redact(secret_values(config))
    if args.log_format is None and config.logging.format != "text":
        setup_logging(verbose=args.verbose, fmt=config.logging.format)

    def announce(gw: Gateway) -> None:
        external = config.broker.external if config.broker.mode == "external" else None
        where = (f"attached to the MQTT broker {external.url}" if external is not None
                 else f"MQTT broker on {config.broker.host}:{gw.broker.port}")
        print(f"iotgw: {where}, data in {config.storage.data_dir}"
              + (f"\n  dashboard: {gw.http.url}" if gw.http else ""), flush=True)

    async def reload(gw: Gateway) -> None:
        try:
            new = load_config(args.config).with_overrides(data_dir=args.data_dir, mqtt_port=args.mqtt_port,
                                                          http_port=args.http_port)
        except ConfigError as exc:
            log.error("reload refused, the running configuration stays: %s", "; ".join(exc.problems))
            return
        redact(secret_values(new))
        await gw.reload(new)

    return _run_gateway(lambda: Gateway(config, port_option="--mqtt-port or [broker] port",
                                        http_port_option="--http-port or [http] port"), args.seconds, announce,
                        reload)
