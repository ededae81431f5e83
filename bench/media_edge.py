"""Media figures through the real daemon: edge + media workers, driven by pjsua2 handsets.

`bench/media.py` runs this by default (`--through-edge`).  It starts `python -m appliance
run` with N caller and N callee users (`[media] max_calls = 8`, `min_idle = 1`, qualify
off), registers PCMA-only pjsua2 handsets, and measures the PBX = the daemon (edge), the
worker zygote and every worker, i.e. the daemon and all its descendants; never the
handsets.

- idle: CPU of the PBX with no call (one warm worker) over --seconds.
- setup latency: a traced handset calls another; the time from its authenticated INVITE
  leaving to the callee handset's incoming_call event (and to the 180 back at the
  caller), through edge + worker, against a second daemon with `[media] max_calls = 0`
  (calls routed in the edge only).  Trials alternate between the two daemons; the
  difference of the medians is the latency a worker adds.  Timestamps are the handset
  controller's `t` (time.monotonic() when the event reached this process), so pipe
  delays are the same on both sides of a difference.
- per call: 1, then 4, then 8 bridged PCMA calls with a tone each way (RTP both ways);
  after a settle time, CPU (utime+stime from /proc/PID/stat, and schedstat ns) of the
  PBX over --seconds, in --slices sub-windows for the spread.  Per call = PBX / calls.
- PSS: /proc/PID/smaps_rollup summed over the PBX with the largest count of calls.
- idle after: the calls hung up, CPU of the now idle workers.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from appliance.ports import free_port  # noqa: E402
from appliance.simulator import tones  # noqa: E402
from appliance.simulator.handset import Handset, close_all  # noqa: E402

REALM = "home.arpa"
PASSWORD = "benchpw"
CALLER_BASE = 3000  # callers 3000.., callees 4000..; the latency pair is 3900 -> 4900
CALLEE_BASE = 4000
LAT_CALLER, LAT_CALLEE = "3900", "4900"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- /proc --------------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (index 0 = state)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def ticks(pid: int) -> int:
    """utime + stime of the whole process (exited threads included), in clock ticks."""
    f = _stat_fields(pid)
    return int(f[11]) + int(f[12]) if f else 0


def sched_ns(pid: int) -> int:
    """On-CPU ns of the live threads (schedstat: ns-precise, for the small figures)."""
    total = 0
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
    return total


def memory_kib(pid: int) -> tuple[int, int]:
    """(PSS, RSS) in KiB, 0s for a process gone."""
    pss = rss = 0
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
            elif line.startswith("Rss:"):
                rss = int(line.split()[1])
    return pss, rss


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    f = _stat_fields(pid)
    return f is not None and f[0] not in ("Z", "X")


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


@dataclass
class Tree:
    """The PBX's processes: the daemon (edge), the zygote, the media workers and the
    history writer."""

    edge: int
    zygote: int | None = None
    workers: list[int] = field(default_factory=list)
    writer: int | None = None

    @property
    def pids(self) -> list[int]:
        helpers = [pid for pid in (self.zygote, self.writer) if pid is not None]
        return [self.edge, *helpers, *self.workers]


def pbx_tree(daemon: int) -> Tree:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            f = _stat_fields(int(name))
            if f is not None and f[0] not in ("Z", "X"):
                children.setdefault(int(f[1]), []).append(int(name))
    tree = Tree(daemon)
    todo = list(children.get(daemon, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        # Forked workers share the zygote's command line: the zygote is the daemon's child.
        if tree.zygote is None and "--zygote" in cmdline(pid) and pid in children.get(daemon, []):
            tree.zygote = pid
        elif "appliance.history.writer" in cmdline(pid):
            tree.writer = pid
        else:
            tree.workers.append(pid)
    return tree


@dataclass
class Window:
    """CPU over one measuring window, in % of one core, per process."""

    seconds: float
    stat: dict[int, float]  # from utime+stime (10 ms ticks)
    ns: dict[int, float]  # from schedstat
    slices: list[dict[int, float]]  # schedstat per sub-window

    def total(self, pids: Iterable[int], src: str = "stat") -> float:
        data = self.stat if src == "stat" else self.ns
        return sum(data.get(p, 0.0) for p in pids)

    def slice_totals(self, pids: Iterable[int]) -> list[float]:
        wanted = list(pids)
        return [sum(s.get(p, 0.0) for p in wanted) for s in self.slices]


def measure(pids: list[int], seconds: float, slices: int) -> Window:
    def snap() -> tuple[float, dict[int, int], dict[int, int]]:
        return time.monotonic(), {p: ticks(p) for p in pids}, {p: sched_ns(p) for p in pids}

    t0, tick0, ns0 = first = snap()
    marks = [first]
    for i in range(slices):
        time.sleep(max(t0 + seconds * (i + 1) / slices - time.monotonic(), 0))
        marks.append(snap())
    t1, tick1, ns1 = marks[-1]
    span = t1 - t0
    parts = []
    for (ta, _, na), (tb, _, nb) in itertools.pairwise(marks):
        parts.append({p: 100 * (nb[p] - na[p]) / 1e9 / (tb - ta) for p in pids})
    return Window(
        span,
        {p: 100 * (tick1[p] - tick0[p]) / CLK_TCK / span for p in pids},
        {p: 100 * (ns1[p] - ns0[p]) / 1e9 / span for p in pids},
        parts,
    )


# -- the daemon ---------------------------------------------------------------------------
def write_config(directory: Path, port: int, pairs: int, max_calls: int, rtp_base: int) -> Path:
    lines = [
        "[server]", f'listen = ["127.0.0.1:{port}"]', f'realm = "{REALM}"', 'state_dir = "state"', "",
        "[registration]", "qualify_interval = 0", "",
        "[media]", f"max_calls = {max_calls}", f"min_idle = {min(max_calls, 1)}",
        f'rtp_ports = "{rtp_base}-{rtp_base + 999}"', "",
    ]  # fmt: skip
    numbers = [str(CALLER_BASE + i) for i in range(pairs)] + [str(CALLEE_BASE + i) for i in range(pairs)]
    for number in [*numbers, LAT_CALLER, LAT_CALLEE]:
        lines += ["[[users]]", f'number = "{number}"', f'password = "{PASSWORD}"', ""]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.toml"
    path.write_text("\n".join(lines))
    return path


class Pbx:
    """`python -m appliance run` with HOMEPBX_LOG_LEVEL=WARNING; stderr kept in a file."""

    def __init__(self, directory: Path, pairs: int, max_calls: int, rtp_base: int) -> None:
        self.port = free_port()
        self.max_calls = max_calls
        config = write_config(directory, self.port, pairs, max_calls, rtp_base)
        self.log_path = directory / "daemon.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, HOMEPBX_LOG_LEVEL="WARNING", PYTHONPATH=str(REPO))
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "run", "--config", str(config)],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=self._log,
        )  # fmt: skip
        self.seen: set[int] = {self.proc.pid}
        """Every PBX pid ever seen, for the leftover check."""

    @property
    def registrar(self) -> str:
        return f"sip:127.0.0.1:{self.port}"

    def tree(self) -> Tree:
        tree = pbx_tree(self.proc.pid)
        self.seen.update(tree.pids)
        return tree

    def wait_ready(self, timeout: float = 15.0) -> float:
        """Until a worker is forked (or, without workers, the port is taken); seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.log_path.read_text()[-2000:]}")
            if self.max_calls and len(self.tree().workers) >= 1:
                return time.monotonic() - self.started
            if not self.max_calls and _port_taken(self.port):
                return time.monotonic() - self.started
            time.sleep(0.02)
        raise TimeoutError("daemon not ready")

    def stop(self) -> list[int]:
        """SIGTERM, wait; returns pids of the PBX still alive afterwards (then killed)."""
        self.tree()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        deadline = time.monotonic() + 5
        left = [p for p in self.seen if p != self.proc.pid and alive(p) and "appliance" in cmdline(p)]
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = [p for p in left if alive(p)]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._log.close()
        return left

    def warnings(self) -> list[str]:
        return [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]


def _port_taken(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


# -- handsets and calls ---------------------------------------------------------------------
def spawn(specs: list[tuple[str, bool]]) -> list[Handset]:
    """Handsets (name, trace), PCMA only, started in parallel."""
    with ThreadPoolExecutor(max_workers=4) as ex:
        futures = [ex.submit(Handset, name=name, codecs=["PCMA"], trace=trace) for name, trace in specs]
        phones = []
        error: BaseException | None = None
        for fut in futures:
            try:
                phones.append(fut.result())
            except BaseException as exc:  # keep the others to close them
                error = exc
        if error is not None:
            close_all(phones)
            raise error
    return phones


def register(pbx: Pbx, phones: list[Handset], numbers: list[str]) -> None:
    for phone, number in zip(phones, numbers, strict=True):
        phone.register(pbx.registrar, number, PASSWORD, wait=False)
    for phone, number in zip(phones, numbers, strict=True):
        event = phone.wait_for("reg_state", timeout=10, aor=f"sip:{number}@{REALM}")
        if event.get("code") != 200:
            raise RuntimeError(f"{phone!r} registration as {number}: {event}")


@dataclass
class Trial:
    first: float  # first INVITE sent -> callee has its INVITE (ms)
    auth: float  # authenticated INVITE sent -> callee has its INVITE
    ring: float  # authenticated INVITE sent -> 180 at the caller
    challenged: bool


def ring_trial(caller: Handset, callee: Handset, number: str) -> Trial:
    """Call, wait for the callee's INVITE and the 180 back, CANCEL, wait for both ends."""
    caller.drain()
    callee.drain()
    mark = time.monotonic()
    call = caller.call(f"sip:{number}@{REALM}")
    incoming = callee.wait_incoming(timeout=10)
    early = caller.wait_state(call, "EARLY", timeout=10)
    caller.hangup(call)
    caller.wait_state(call, "DISCONNECTED", timeout=10)
    callee.wait_state(str(incoming["call"]), "DISCONNECTED", timeout=10)
    deadline = time.monotonic() + 2
    while True:  # a trace can arrive after the state change it caused
        invites = [e["t"] for e in caller.events_of("sip", dir="tx")
                   if e["t"] >= mark and str(e.get("msg", "")).startswith("INVITE ")]  # fmt: skip
        if invites or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    if not invites:
        raise RuntimeError("no traced INVITE from the caller")
    got = float(incoming["t"])
    return Trial(1000 * (got - invites[0]), 1000 * (got - invites[-1]), 1000 * (float(early["t"]) - invites[-1]),
                 len(invites) > 1)  # fmt: skip


@dataclass
class Bridged:
    a: Handset
    b: Handset
    call_a: str
    call_b: str


def bridge(a: Handset, b: Handset, number: str) -> Bridged:
    """A PCMA call a -> PBX -> b (b auto-answers), then a tone each way."""
    call_a = a.call(f"sip:{number}@{REALM}")
    call_b = str(b.wait_incoming(timeout=10)["call"])
    a.wait_state(call_a, "CONFIRMED", timeout=10)
    a.wait_for("media", call=call_a, status="active", timeout=10)
    b.wait_for("media", call=call_b, status="active", timeout=10)
    a.play_tone(call_a, 440)
    b.play_tone(call_b, 1000)
    return Bridged(a, b, call_a, call_b)


def check_audio(c: Bridged, directory: Path) -> tuple[float, float]:
    """(level of b's tone heard by a, of a's tone heard by b) in dB: RTP flows both ways."""
    c.a.record(c.call_a, directory / "a.wav")
    c.b.record(c.call_b, directory / "b.wav")
    time.sleep(1.5)
    heard_a = str(c.a.stop_media(c.call_a)["path"])
    heard_b = str(c.b.stop_media(c.call_b)["path"])
    return tones.tone_level_db(heard_a, 1000), tones.tone_level_db(heard_b, 440)


def hang_up(calls: list[Bridged]) -> None:
    for c in calls:
        c.a.hangup(c.call_a)
    for c in calls:
        c.b.wait_state(c.call_b, "DISCONNECTED", timeout=10)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if values else "-"


# -- main -------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> None:
    counts = sorted({int(x) for x in str(args.calls).split(",")})
    n_max = max(counts)
    seconds = float(args.seconds)
    slices = max(int(args.slices), 1)
    trials = int(args.latency_trials or 30)
    # Below the ephemeral ports (the handsets' RTP) and apart from a concurrent bench's daemon.
    rtp_base = 12000 + 1000 * (os.getpid() % 20)
    began = time.monotonic()
    print(f"media through the daemon (edge + workers), PCMA; {os.cpu_count()} CPUs; load {loadavg()}")
    print(f"PBX = daemon (edge) + zygote + workers; handsets not counted; CPU in % of one core, "
          f"{seconds:.0f} s windows in {slices} slices (spread = min-max of the slices)")

    phones: list[Handset] = []
    lat0: list[Handset] = []
    pbxs: list[Pbx] = []
    leftovers: list[int] = []
    with tempfile.TemporaryDirectory(prefix="bench-media-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            pbx = Pbx(tmp / "workers", n_max, max(8, n_max), rtp_base)
            pbxs.append(pbx)
            ready = pbx.wait_ready()
            specs = [(f"a{i}", False) for i in range(n_max)] + [(f"b{i}", False) for i in range(n_max)]
            phones = spawn([*specs, ("lat-a", True), ("lat-b", False)])
            callers, callees, (lat_a, lat_b) = phones[:n_max], phones[n_max : 2 * n_max], phones[2 * n_max :]
            register(pbx, phones, [str(CALLER_BASE + i) for i in range(n_max)]
                     + [str(CALLEE_BASE + i) for i in range(n_max)] + [LAT_CALLER, LAT_CALLEE])  # fmt: skip
            for phone in callees:
                phone.auto_answer("answer")
            lat_b.auto_answer("ring")
            print(f"daemon up, first worker forked after {ready * 1000:.0f} ms; {len(phones)} handsets registered"
                  f" ({time.monotonic() - began:.1f} s)")

            # idle
            time.sleep(1.5)
            tree = pbx.tree()
            w = measure(tree.pids, seconds, slices)
            idle = tree.workers
            print(f"\n== idle (no call), load {loadavg()}")
            zygote = [tree.zygote] if tree.zygote else []
            print(f"  edge {w.total([tree.edge], 'ns'):.3f} %   zygote {w.total(zygote, 'ns'):.3f} %"
                  f"   {len(idle)} idle worker(s) {w.total(idle, 'ns') / max(len(idle), 1):.3f} % each"
                  f" (slices {spread([t / max(len(idle), 1) for t in w.slice_totals(idle)])})"
                  f"   PBX {w.total(tree.pids, 'ns'):.3f} %")  # fmt: skip
            idle_worker = w.total(idle, "ns") / max(len(idle), 1)
            idle_edge = w.total([tree.edge], "ns")

            # setup latency: workers vs edge only, alternating
            pbx0 = Pbx(tmp / "edge-only", n_max, 0, rtp_base)
            pbxs.append(pbx0)
            pbx0.wait_ready()
            lat0 = spawn([("lat0-a", True), ("lat0-b", False)])
            register(pbx0, lat0, [LAT_CALLER, LAT_CALLEE])
            lat0[1].auto_answer("ring")
            print(f"\n== call setup: {trials} calls each way, alternating; load {loadavg()}")
            with_w: list[Trial] = []
            without: list[Trial] = []
            for _ in range(trials):
                without.append(ring_trial(lat0[0], lat0[1], LAT_CALLEE))
                time.sleep(0.1)
                with_w.append(ring_trial(lat_a, lat_b, LAT_CALLEE))
                time.sleep(0.25)  # a worker rests after a call; keep one warm
            leftovers += pbx0.stop()
            close_all(lat0)
            lat0 = []

            def row(label: str, get: Callable[[Trial], float]) -> tuple[float, float]:
                a = [get(t) for t in with_w]
                b = [get(t) for t in without]
                print(f"  {label:44} edge+worker p50 {statistics.median(a):6.2f} p95 {pct(a, .95):6.2f} max"
                      f" {max(a):6.2f} | edge only p50 {statistics.median(b):6.2f} p95 {pct(b, .95):6.2f}"
                      f" | added p50 {statistics.median(a) - statistics.median(b):+6.2f}"
                      f" p95 {pct(a, .95) - pct(b, .95):+6.2f} ms")  # fmt: skip
                return statistics.median(a) - statistics.median(b), pct(a, 0.95) - pct(b, 0.95)

            added = row("auth. INVITE sent -> callee has INVITE", lambda t: t.auth)
            row("auth. INVITE sent -> 180 back at caller", lambda t: t.ring)
            row("first INVITE sent -> callee has INVITE", lambda t: t.first)
            print(f"  (407 challenge on {sum(t.challenged for t in with_w + without)} of {2 * trials} calls)")

            # bridged calls
            calls: list[Bridged] = []
            results: dict[int, tuple[float, float, float, float, str]] = {}
            print(f"\n== bridged PCMA calls, tone both ways; settle {args.settle:.0f} s")
            print("  PBX and per call from utime+stime; (schedstat) and the shares from schedstat ns")
            print(f"  {'calls':>5} {'PBX %':>7} {'per call %':>10} {'(schedstat)':>11} {'spread/call':>12}"
                  f" {'edge %':>7} {'edge/call':>9} {'workers %':>9} {'zygote %':>8}  load")  # fmt: skip
            for n in counts:
                t0 = time.monotonic()
                for i in range(len(calls), n):
                    calls.append(bridge(callers[i], callees[i], str(CALLEE_BASE + i)))
                setup = time.monotonic() - t0
                time.sleep(args.settle)
                tree = pbx.tree()
                w = measure(tree.pids, seconds, slices)
                total = w.total(tree.pids)
                edge = w.total([tree.edge], "ns")  # the small shares: ns-precise
                workers = w.total(tree.workers, "ns")
                zyg = w.total([tree.zygote], "ns") if tree.zygote else 0.0
                per = [t / n for t in w.slice_totals(tree.pids)]
                print(f"  {n:5d} {total:7.2f} {total / n:10.3f} {w.total(tree.pids, 'ns') / n:11.3f}"
                      f" {spread(per):>12} {edge:7.2f} {edge / n:9.3f} {workers:9.2f} {zyg:8.3f}  {loadavg()}"
                      f"   ({len(tree.workers)} workers; new calls set up in {setup * 1000:.0f} ms)")  # fmt: skip
                results[n] = (total, total / n, edge, workers, spread(per))
            tree = pbx.tree()
            mem = {p: memory_kib(p) for p in tree.pids}
            pss = sum(m[0] for m in mem.values()) / 1024
            busy_pss = [mem[p][0] / 1024 for p in tree.workers]
            print(f"\n== memory with {len(calls)} calls: PBX PSS {pss:.1f} MB = edge {mem[tree.edge][0] / 1024:.1f}"
                  f" + zygote {mem[tree.zygote][0] / 1024 if tree.zygote else 0:.1f}"
                  f" + {len(tree.workers)} workers {sum(busy_pss):.1f} ({statistics.mean(busy_pss):.1f} each);"
                  f" RSS sum {sum(m[1] for m in mem.values()) / 1024:.1f} MB")  # fmt: skip
            level_a, level_b = check_audio(calls[0], tmp)
            print(f"  audio check, call 1: caller hears callee's tone at {level_a:.1f} dB,"
                  f" callee hears caller's at {level_b:.1f} dB (>-8 dB: clearly there)")

            hang_up(calls)
            time.sleep(1.5)
            tree = pbx.tree()
            w = measure(tree.pids, seconds, slices)
            after = w.total(tree.workers, "ns") / max(len(tree.workers), 1)
            print(f"\n== idle after hang-up: {len(tree.workers)} idle workers {after:.3f} % each"
                  f" (slices {spread([t / max(len(tree.workers), 1) for t in w.slice_totals(tree.workers)])}),"
                  f" edge {w.total([tree.edge], 'ns'):.3f} %, PBX {w.total(tree.pids, 'ns'):.3f} %; load {loadavg()}")

            print("\n== summary (target)")
            top = results[n_max]
            print(f"  CPU per bridged call at {n_max} calls:  {top[1]:.3f} % of a core  (<= 1 %)"
                  f"  [edge share {top[2] / n_max:.3f} %/call]")
            for n in counts[:-1]:
                print(f"  CPU per bridged call at {n} call(s):   {results[n][1]:.3f} %")
            print(f"  idle worker CPU:                  {idle_worker:.3f} % (1 warm), {after:.3f} % (after calls)"
                  f"  (<= 0.3 %); idle edge {idle_edge:.3f} %")
            print(f"  PBX PSS with {len(calls)} calls:            {pss:.1f} MB  (<= 150 MB)")
            print(f"  setup latency added by a worker:  p50 {added[0]:+.2f} ms, p95 {added[1]:+.2f} ms  (<= 20 ms)")
        finally:
            close_all([*phones, *lat0])
            for p in pbxs:
                leftovers += p.stop()
            warn = [line for p in pbxs for line in p.warnings()]
            if warn:
                print(f"\ndaemon stderr ({len(warn)} lines), last ones:\n  " + "\n  ".join(warn[-8:]))
            stray = [ph.pid for ph in phones if alive(ph.pid)]
            print(f"\nleftover processes: {leftovers + stray or 'none'}; total {time.monotonic() - began:.0f} s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of this mode (bench/media.py has --calls, --seconds, --latency-trials)."""
    parser.add_argument("--settle", type=float, default=3.0, help="seconds after set-up before measuring")
    parser.add_argument("--slices", type=int, default=5, help="sub-windows per measurement, for the spread")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--calls", default="1,4,8", help="concurrent call counts to measure")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--latency-trials", type=int, default=30)
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
