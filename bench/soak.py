"""Registration soak: the daemon's RSS under a steady rate of digest registrations.

Starts the real daemon on a loopback port (bench/register.py's config and start), prints
its idle RSS, then runs load-generator processes doing full digest registrations
(REGISTER -> 401 -> REGISTER with Authorization -> 200, bench/register.py's client) at
`--rate` per second in all for `--minutes`, and prints the daemon's RSS every
`--interval` seconds. Memory that levels off is the bounded caches filling; memory that
keeps growing is a leak. Prints figures; it is not a test and asserts nothing.

    .venv/bin/python bench/soak.py [--rate 500] [--minutes 10] [--users 2000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from appliance.ports import free_port  # noqa: E402
from bench.register import client, cpu_seconds, rss_kib, start_daemon, write_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rate", type=float, default=500.0, help="registrations per second, in all")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--users", type=int, default=2000, help="numbers registering in turn (one binding each)")
    parser.add_argument("--clients", type=int, default=2, help="load-generator processes")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument("--after", type=float, default=0.0,
                        help="seconds to keep sampling once the load stops (caches draining)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        config = write_config(Path(tmp), port, args.users)
        proc, _ = start_daemon(config)
        try:
            time.sleep(2.0)
            idle = rss_kib(proc.pid)
            print(f"idle: RSS {idle / 1024:.1f} MB ({args.users} users, no bindings)")
            seconds = args.minutes * 60
            numbers = [str(10000 + i) for i in range(args.users)]
            queue: mp.Queue = mp.Queue()  # type: ignore[type-arg]
            workers = [
                mp.Process(target=client, args=(port, numbers[i :: args.clients], seconds, 64, queue, False,
                                                args.rate / args.clients))
                for i in range(args.clients)
            ]
            started = time.monotonic()
            cpu_before = cpu_seconds(proc.pid)
            for w in workers:
                w.daemon = True  # gone with this process, should it be interrupted
                w.start()
            peak = idle
            next_sample = started + args.interval
            while any(w.is_alive() for w in workers):
                time.sleep(max(0.0, min(next_sample - time.monotonic(), 0.5)))
                if time.monotonic() >= next_sample:
                    rss = rss_kib(proc.pid)
                    peak = max(peak, rss)
                    print(f"{time.monotonic() - started:6.0f} s  RSS {rss / 1024:6.1f} MB "
                          f"({rss / idle:.2f}x idle)", flush=True)
                    next_sample += args.interval
            results = [queue.get() for _ in workers]
            for w in workers:
                w.join()
            wall = time.monotonic() - started
            cpu = cpu_seconds(proc.pid) - cpu_before
            done = sum(r[0] for r in results)
            failed = sum(r[1] for r in results)
            print(f"registrations: {done} in {wall:.0f} s = {done / wall:,.0f}/s (asked {args.rate:,.0f}/s; "
                  f"failed/timed out {failed}); daemon CPU {cpu / wall * 100:.0f}% of one core")
            end = rss_kib(proc.pid)
            print(f"RSS: idle {idle / 1024:.1f} MB, peak {max(peak, end) / 1024:.1f} MB, at the end "
                  f"{end / 1024:.1f} MB ({end / idle:.2f}x idle)")
            stop = time.monotonic() + args.after
            while time.monotonic() < stop:
                time.sleep(min(args.interval, max(0.0, stop - time.monotonic())))
                print(f"after load +{args.after - (stop - time.monotonic()):4.0f} s  RSS "
                      f"{rss_kib(proc.pid) / 1024:6.1f} MB", flush=True)
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
