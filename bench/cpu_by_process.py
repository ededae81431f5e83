"""CPU per call, split by process, under a SIPp burst: where an anchored call's cost goes.

`bench/media_vs_asterisk.py` gives calls/s side by side; this says who spent the CPU while
they were made: the edge (the daemon), the media workers (the zygote's children, summed),
the SIPp caller and callee, or the anchor's own process. Each process's on-CPU time
(schedstat, every thread) is sampled every 0.2 s while SIPp runs; a worker that exits
(recycled, retired) counts with its last sample, so the workers' figure is a floor. The
same load as media_vs_asterisk's burst (INVITE, 407, 200, ACK, BYE at once, no RTP).
Prints figures; asserts nothing.

    .venv/bin/python bench/cpu_by_process.py [--calls 3000] [--in-flight 10]
        [--target homepbx|edge|asterisk|kamailio]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.media_edge import cmdline, pbx_tree, sched_ns  # noqa: E402
from bench.media_vs_asterisk import Sipp, Target, asterisk, homepbx, kamailio  # noqa: E402

SAMPLE_S = 0.2


def role(pid: int, target: Target, edge: int | None) -> str:
    """Which part of the run a process is (by what it runs)."""
    command = cmdline(pid)
    if pid == edge:
        return "edge (daemon)"
    if "appliance.history.writer" in command:
        return "history writer"
    if "appliance.media.worker" in command or (edge is not None and pid in pbx_tree(edge).pids):
        return "media workers"
    if command.startswith("sipp"):
        return "SIPp callee" if "callee.xml" in command else "SIPp caller"
    return target.name


def run(target: Target, workdir: Path, calls: int, in_flight: int) -> None:
    target.start()
    try:
        sipp = Sipp(workdir)
        with sipp.callee(target):
            edge = target.pids()[0] if target.name.startswith("homepbx") else None
            first: dict[int, int] = {}
            last: dict[int, int] = {}
            roles: dict[int, str] = {}

            def sample(sipp_pids: list[int]) -> None:
                for pid in {*target.pids(), *sipp_pids}:
                    ns = sched_ns(pid)
                    if not ns:
                        continue
                    roles.setdefault(pid, role(pid, target, edge))
                    first.setdefault(pid, ns)
                    last[pid] = ns

            callee = [int(p) for p in _sipp_pids()]
            sample(callee)
            first.update(last)  # what ran before the burst is not the burst's
            started = time.monotonic()
            proc = sipp.calls(target, calls, in_flight, wait=False)
            assert isinstance(proc, subprocess.Popen)
            while proc.poll() is None:
                sample([*callee, proc.pid])
                time.sleep(SAMPLE_S)
            sample(callee)
            wall = time.monotonic() - started
    finally:
        target.stop()
    by_role: dict[str, float] = defaultdict(float)
    for pid, ns in last.items():
        by_role[roles[pid]] += (ns - first.get(pid, ns)) / 1e9
    total = sum(by_role.values())
    print(f"{target.name}: {calls} calls, {in_flight} in flight, {wall:.1f} s, {calls / wall:.0f} calls/s")
    for name, seconds in sorted(by_role.items(), key=lambda kv: -kv[1]):
        print(f"  {name:16} {1000 * seconds / calls:6.3f} ms CPU per call  ({100 * seconds / wall:5.1f} % of a core)")
    print(f"  {'all':16} {1000 * total / calls:6.3f} ms CPU per call")


def _sipp_pids() -> list[str]:
    return subprocess.run(["pgrep", "-x", "sipp"], capture_output=True, text=True).stdout.split()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--in-flight", type=int, default=10)
    parser.add_argument("--target", choices=("homepbx", "edge", "asterisk", "kamailio"), default="homepbx")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="cpu-by-process-"))
    made: Target | str
    if args.target == "homepbx":
        made = homepbx(workdir, 64)
    elif args.target == "edge":
        made = homepbx(workdir, 0)
    elif args.target == "asterisk":
        made = asterisk()
    else:
        made = kamailio(workdir)
    if isinstance(made, str):
        print(made)
        return
    run(made, workdir, args.calls, args.in_flight)


if __name__ == "__main__":
    main()
