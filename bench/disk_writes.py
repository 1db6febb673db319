"""SD-card wear: fsyncs and bytes written per reading by a gateway under the demo's load, with the default
``[storage] commit_interval_s`` and with the low-latency setting (0), side by side.

    .venv/bin/python bench/disk_writes.py [--seconds 20] [--warmup 6] [--intervals 1.0 0]

Each setting runs the demo (``iotgw demo``: an SDS011 on a pseudo-terminal, a BTHome sensor on a
simulated radio, an MQTT CO2 sensor; about 6.5 readings a second) in a process of its own, with its
data directory on the disk (not a tmpfs). After the warm-up, ``strace -f -c`` is attached to the
gateway's process for ``--seconds`` and counts ``fdatasync``/``fsync`` (each one a flash write an SD
card wears with) and ``pwrite64`` calls; ``/proc/PID/io`` gives the bytes the process had written to
storage, and the store's row count the readings stored in the same window. Needs strace
(``apt-get install strace``) and ptrace rights (root in these containers).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _harness import ROOT, free_port

SYSCALLS = ("fdatasync", "fsync", "pwrite64")


def serve(data_dir: Path, port: int, interval_s: float, seconds: float) -> None:
    """The demo gateway with ``commit_interval_s`` set, for ``seconds``."""
    from gateway.cli.demo import demo_config, demo_gateway  # noqa: PLC0415  (only in the served process)

    config = demo_config(data_dir, port).with_overrides(http_port=0)
    config = config.model_copy(update={"storage": config.storage.model_copy(update={"commit_interval_s": interval_s})})

    async def run() -> None:
        async with demo_gateway(config):
            await asyncio.sleep(seconds)

    asyncio.run(run())


def _stored(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return int(conn.execute("SELECT count(*) FROM readings").fetchone()[0])
    except sqlite3.Error:
        return 0


def _write_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def _counts(strace_output: str) -> dict[str, int]:
    """``strace -c``'s table: calls per syscall."""
    counts = dict.fromkeys(SYSCALLS, 0)
    for line in strace_output.splitlines():
        fields = line.split()
        if fields and fields[-1] in counts and re.fullmatch(r"\d+", fields[3] if len(fields) > 4 else ""):
            counts[fields[-1]] = int(fields[3])
    return counts


def measure(interval_s: float, seconds: float, warmup: float, work: Path) -> dict[str, float]:
    data = work / f"data-{interval_s:g}"
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(data), str(port), str(interval_s), str(warmup + seconds + 30)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(warmup)
        if proc.poll() is not None:
            raise SystemExit(f"the demo gateway exited: {proc.returncode}")
        db = data / "iotgw.sqlite3"
        readings, written = _stored(db), _write_bytes(proc.pid)
        started = time.monotonic()
        traced = subprocess.run(
            ["timeout", "-s", "INT", str(seconds), "strace", "-f", "-c", "-e", "trace=" + ",".join(SYSCALLS),
             "-p", str(proc.pid)], capture_output=True, text=True, check=False,
        )
        elapsed = time.monotonic() - started
        readings, written = _stored(db) - readings, _write_bytes(proc.pid) - written
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    counts = _counts(traced.stderr)
    if not any(counts.values()):
        raise SystemExit(f"strace counted nothing:\n{traced.stderr}")
    syncs = counts["fdatasync"] + counts["fsync"]
    return {"interval": interval_s, "seconds": elapsed, "readings": readings, "fsyncs": syncs,
            "pwrite64": counts["pwrite64"], "bytes": written}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="how long strace counts")
    parser.add_argument("--warmup", type=float, default=6.0, help="seconds after start before counting")
    parser.add_argument("--intervals", type=float, nargs="+", default=[1.0, 0.0],
                        help="commit_interval_s settings to compare (default: the default, then low latency)")
    parser.add_argument("--serve", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        data, port, interval, seconds = args.serve
        serve(Path(data), int(port), float(interval), float(seconds))
        return
    # on the disk, not a tmpfs: /proc/PID/io counts what reaches storage
    with tempfile.TemporaryDirectory(prefix="iotgw-disk-", dir=os.environ.get("BENCH_DIR", ROOT / "build")) as tmp:
        print(f"demo load, {args.seconds:.0f} s counted after {args.warmup:.0f} s of warm-up, data in {tmp}")
        print(f"{'commit_interval_s':>17}  {'readings/s':>10}  {'fsyncs/s':>8}  {'pwrite64/s':>10}  "
              f"{'fsyncs/reading':>14}  {'bytes written/reading':>21}")
        for interval in args.intervals:
            r = measure(interval, args.seconds, args.warmup, Path(tmp))
            s, n = r["seconds"], max(r["readings"], 1)
            print(f"{interval:>17g}  {r['readings'] / s:>10.1f}  {r['fsyncs'] / s:>8.2f}  {r['pwrite64'] / s:>10.1f}  "
                  f"{r['fsyncs'] / n:>14.2f}  {r['bytes'] / n:>21,.0f}", flush=True)


if __name__ == "__main__":
    main()
