"""homepbx side by side with Asterisk 22 (media anchored) and Kamailio (edge only), one run.

The same SIPp load goes to each, on loopback, one after the other (issue 15's figures):

* calls/s and failures: `--calls` calls with 10, then 50 in flight (INVITE, 407/401 with
  digest, 200, ACK, BYE at once; no RTP): homepbx with `[media] max_calls = 64` against
  Asterisk 22 (PJSIP, `direct_media = no`); homepbx edge-only (`max_calls = 0`) against
  Kamailio 5.6, with `--edge-calls` calls (about five times as fast, so as long a run).
* call-setup latency p50/p95: one call in flight, the authenticated INVITE sent to its
  200 received (SIPp's rtd; the callee SIPp answers at once), so "added" is homepbx
  anchored less homepbx edge-only.
* CPU per bridged PCMA call at 1, 4, 8 calls, RTP both ways: the caller SIPp plays a
  20-ms PCMA stream (a generated tone, pcap), the callee SIPp echoes it back
  (`-rtp_echo`).  CPU = on-CPU time (schedstat) of every process of the PBX over
  `--seconds` / wall / calls; homepbx = the daemon, its zygote and workers.
* memory with 8 calls: PSS of every homepbx process summed (smaps_rollup) against
  Asterisk's RSS (and PSS).

Ratios come from one run on one machine; absolute figures drift with the machine and
with what else runs on it (the load generators share its cores).  An anchor that is not
installed is skipped with a note (Asterisk: `../shared/anchors/asterisk/make_sidroot.sh`
as root, once; Kamailio: Debian's `kamailio`).

    .venv/bin/python bench/media_vs_asterisk.py [--calls 1000] [--edge-calls 5000] [--seconds 10] [--uncapped]
        [--only homepbx,asterisk,edge,kamailio] [--no-cpu] [--no-burst] [--calls-per-worker N]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from appliance.ports import free_port  # noqa: E402
from bench.media_edge import alive, measure, memory_kib, pbx_tree  # noqa: E402

HOST = "127.0.0.1"
_PLACES = (Path(os.environ.get("HOMEPBX_ANCHORS", "/nonexistent")), REPO.parent / "shared" / "anchors",
           REPO.parent.parent / "shared" / "anchors")
ANCHORS = next((p for p in _PLACES if p.is_dir()), _PLACES[1])
"""../shared/anchors of the main checkout (or $HOMEPBX_ANCHORS)."""
ASTERISK_SH = ANCHORS / "asterisk" / "run_asterisk.sh"
KAMAILIO_SH = ANCHORS / "kamailio" / "run_kamailio.sh"
SIDROOT = Path(os.environ.get("SIDROOT", "/tmp/homepbx-anchors/sidroot"))
CALLER, CALLER_PW = "100", "secret100"  # the anchors' users, given to homepbx too
CALLEE, CALLEE_PW = "200", "secret200"
PTIME_MS = 20

# -- SIPp scenarios -------------------------------------------------------------------------
_SDP = """
      v=0
      o=- 1 1 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 8
      a=rtpmap:8 PCMA/8000
      a=ptime:20
"""
_INVITE = """
      INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
      From: <sip:{caller}@[remote_ip]>;tag=[pid]c[call_number]
      To: <sip:[service]@[remote_ip]>
      Call-ID: [call_id]
      CSeq: {cseq} INVITE
      Contact: <sip:{caller}@[local_ip]:[local_port]>
      {auth}
      Max-Forwards: 70
      User-Agent: SIPp
      Content-Type: application/sdp
      Content-Length: [len]
"""
_IN_DIALOG = """
      {method} {uri} SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
      From: <sip:{caller}@[remote_ip]>;tag=[pid]c[call_number]
      [last_To:]
      Call-ID: [call_id]
      CSeq: {cseq} {method}
      {routes}
      Max-Forwards: 70
      Content-Length: 0
"""


def caller_scenario(pcap: Path | None, hold_ms: int) -> str:
    """INVITE, the digest challenge (407 from a proxy, 401 from Asterisk), INVITE with
    credentials (the rtd "setup" runs from it to the 200), ACK, optionally RTP from
    `pcap` for `hold_ms`, BYE."""
    first = _INVITE.format(caller=CALLER, cseq=1, auth="") + _SDP
    second = _INVITE.format(caller=CALLER, cseq=2, auth="[authentication]") + _SDP
    ack1 = _IN_DIALOG.format(method="ACK", uri="sip:[service]@[remote_ip]:[remote_port]", caller=CALLER, cseq=1,
                             routes="").replace("branch=[branch]", "branch=[last_branch]")
    ack = _IN_DIALOG.format(method="ACK", uri="[next_url]", caller=CALLER, cseq=2, routes="[routes]")
    bye = _IN_DIALOG.format(method="BYE", uri="[next_url]", caller=CALLER, cseq=3, routes="[routes]")
    media = ""
    if pcap is not None:
        media = (f'<nop><action><exec play_pcap_audio="{pcap}"/></action></nop>\n'
                 f'<pause milliseconds="{hold_ms}"/>\n')
    return f"""<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="bench caller">
<send retrans="500"><![CDATA[{first}
]]></send>
<recv response="100" optional="true"/>
<recv response="401" auth="true" optional="true" next="challenged"/>
<recv response="407" auth="true"/>
<label id="challenged"/>
<send><![CDATA[{ack1}
]]></send>
<send retrans="500" start_rtd="setup"><![CDATA[{second}
]]></send>
<recv response="100" optional="true"/>
<recv response="180" optional="true"/>
<recv response="183" optional="true"/>
<recv response="200" rrs="true" rtd="setup"/>
<send><![CDATA[{ack}
]]></send>
{media}<send retrans="500"><![CDATA[{bye}
]]></send>
<recv response="200"/>
<ResponseTimeRepartition value="1, 2, 5, 10, 20, 50, 100, 200"/>
</scenario>
"""


def callee_scenario() -> str:
    """Answer at once with PCMA (SIPp's -rtp_echo sends the RTP back), ACK, BYE."""
    reply = """
      SIP/2.0 {status}
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]d[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      [last_Record-Route:]
      Contact: <sip:{callee}@[local_ip]:[local_port]>
"""
    ok = (reply.format(status="200 OK", callee=CALLEE)
          + "      Content-Type: application/sdp\n      Content-Length: [len]\n" + _SDP)
    ringing = reply.format(status="180 Ringing", callee=CALLEE) + "      Content-Length: 0\n"
    bye_ok = """
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0
"""
    return f"""<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="bench callee">
<recv request="INVITE" rrs="true"/>
<send><![CDATA[{ringing}
]]></send>
<send retrans="500"><![CDATA[{ok}
]]></send>
<recv request="ACK"/>
<recv request="BYE"/>
<send><![CDATA[{bye_ok}
]]></send>
</scenario>
"""


REGISTER = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="bench register">
<send retrans="500"><![CDATA[
      REGISTER sip:[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
      From: <sip:[service]@[remote_ip]>;tag=[pid]reg[call_number]
      To: <sip:[service]@[remote_ip]>
      Call-ID: [call_id]
      CSeq: 1 REGISTER
      Contact: <sip:[service]@[local_ip]:[local_port]>
      Max-Forwards: 70
      User-Agent: SIPp
      Expires: 3600
      Content-Length: 0

]]></send>
<recv response="401" auth="true"/>
<send retrans="500"><![CDATA[
      REGISTER sip:[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
      From: <sip:[service]@[remote_ip]>;tag=[pid]reg[call_number]
      To: <sip:[service]@[remote_ip]>
      Call-ID: [call_id]
      CSeq: 2 REGISTER
      Contact: <sip:[service]@[local_ip]:[local_port]>
      [authentication]
      Max-Forwards: 70
      User-Agent: SIPp
      Expires: 3600
      Content-Length: 0

]]></send>
<recv response="200"/>
</scenario>
"""


def write_pcap(path: Path, seconds: float, hz: float = 440.0) -> None:
    """A PCMA tone as 20-ms RTP packets in a pcap (SIPp's play_pcap_audio replays it)."""
    import audioop  # deprecated in 3.11, still here; only the bench uses it

    rate, step = 8000, 8000 * PTIME_MS // 1000
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    for n in range(int(seconds * 1000 / PTIME_MS)):
        pcm = b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * hz * (n * step + i) / rate)))
                       for i in range(step))
        rtp = struct.pack("!BBHII", 0x80, 8, n & 0xFFFF, (n * step) & 0xFFFFFFFF, 0x1234) + audioop.lin2alaw(pcm, 2)
        udp = struct.pack("!HHHH", 4000, 4000, 8 + len(rtp), 0) + rtp
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, bytes([127, 0, 0, 1]),
                         bytes([127, 0, 0, 1])) + udp
        frame = b"\0" * 12 + b"\x08\x00" + ip
        t = n * PTIME_MS / 1000
        out.append(struct.pack("<IIII", int(t), int((t % 1) * 1e6), len(frame), len(frame)) + frame)
    path.write_bytes(b"".join(out))


# -- the systems ----------------------------------------------------------------------------
@dataclass
class Target:
    name: str
    port: int
    start: Callable[[], None]
    stop: Callable[[], None]
    pids: Callable[[], list[int]]
    figures: dict[str, object] = field(default_factory=dict)


def homepbx(workdir: Path, max_calls: int, calls_per_worker: int | None = None) -> Target:
    port = free_port()
    rtp = 30000 + (os.getpid() % 100) * 100  # 64 + 2 slices of 8 ports... give it 1000
    config = workdir / f"homepbx-{max_calls}" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(
        f'[server]\nlisten = ["{HOST}:{port}"]\nrealm = "home.arpa"\nstate_dir = "state"\n'
        '# SIPp answers MD5 only (as the anchors offer)\ndigest_algorithms = ["MD5"]\n\n'
        "[registration]\nqualify_interval = 0\n\n"
        f'[media]\nmax_calls = {max_calls}\nmin_idle = {min(max_calls, 1)}\nrtp_ports = "{rtp}-{rtp + 1199}"\n'
        + (f"calls_per_worker = {calls_per_worker}\n" if calls_per_worker is not None else "") + "\n"
        f'[[users]]\nnumber = "{CALLER}"\npassword = "{CALLER_PW}"\n\n'
        f'[[users]]\nnumber = "{CALLEE}"\npassword = "{CALLEE_PW}"\none_number = true\nmax_devices = 3\n'
    )
    state: dict[str, subprocess.Popen[bytes]] = {}

    def start() -> None:
        log = open(config.parent / "daemon.log", "wb")  # noqa: SIM115 - lives as long as the daemon
        env = dict(os.environ, HOMEPBX_LOG_LEVEL="WARNING", PYTHONPATH=str(REPO))
        proc = subprocess.Popen([sys.executable, "-m", "appliance", "run", "--config", str(config)], cwd=REPO,
                                env=env, stdout=subprocess.DEVNULL, stderr=log)
        state["proc"] = proc
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError((config.parent / "daemon.log").read_text()[-2000:])
            if (not max_calls or pbx_tree(proc.pid).workers) and _udp_bound(port):
                return
            time.sleep(0.05)
        raise TimeoutError("homepbx not ready")

    def stop() -> None:
        proc = state.get("proc")
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def pids() -> list[int]:
        proc = state.get("proc")
        return pbx_tree(proc.pid).pids if proc is not None else []

    name = "homepbx" if max_calls else "homepbx edge-only"
    return Target(name, port, start, stop, pids)


def _udp_bound(port: int) -> bool:
    out = subprocess.run(["ss", "-Hlnu", f"( sport = :{port} )"], capture_output=True, text=True).stdout
    return f"{HOST}:{port}" in out


def _anchor(name: str, script: Path, port: int, env: dict[str, str], pidfile: Path) -> Target:
    full_env = dict(os.environ, PBX_HOST=HOST, PBX_PORT=str(port), **env)

    def start() -> None:
        subprocess.run(["bash", str(script), "start"], env=full_env, check=True, capture_output=True)
        if script == ASTERISK_SH:  # contacts of an earlier run live on in its astdb (3 at most)
            subprocess.run(["bash", str(script), "cli", "database deltree registrar/contact"], env=full_env,
                           capture_output=True)

    def stop() -> None:
        subprocess.run(["bash", str(script), "stop"], env=full_env, capture_output=True)

    def pids() -> list[int]:
        try:
            main = int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return []
        return [main, *pbx_tree(main).pids[1:]]

    return Target(name, port, start, stop, pids)


def asterisk() -> Target | str:
    if not (SIDROOT / "usr/sbin/asterisk").exists() or os.geteuid() != 0:
        return f"Asterisk skipped: no {SIDROOT}/usr/sbin/asterisk (as root: {ANCHORS}/asterisk/make_sidroot.sh)"
    status = subprocess.run(["bash", str(ASTERISK_SH), "status"], capture_output=True, text=True).stdout
    if "running" in status and "not running" not in status:
        return "Asterisk skipped: the anchor is already running (someone else's run); try again later"
    return _anchor("Asterisk 22", ASTERISK_SH, free_port(), {}, SIDROOT / "srv/anchor-ast/asterisk.pid")


def kamailio(workdir: Path) -> Target | str:
    if shutil.which("kamailio") is None and not Path("/usr/sbin/kamailio").exists():
        return "Kamailio skipped: not installed (apt-get install kamailio)"
    state = workdir / "kamailio"
    return _anchor("Kamailio 5.6", KAMAILIO_SH, free_port(), {"KAM_STATE_DIR": str(state)}, state / "kamailio.pid")


# -- SIPp runs ------------------------------------------------------------------------------
@dataclass
class Run:
    ok: int
    failed: int
    seconds: float
    rtt_ms: list[float]


class Sipp:
    def __init__(self, workdir: Path, rate_cap: bool = True) -> None:
        self.dir = workdir
        self.rate_cap = rate_cap
        """SIPp starts at most 50 calls/s per call in flight (-r), as every earlier figure
        was taken; off (--uncapped), calls start as fast as the in-flight limit allows."""
        self.caller_plain = workdir / "caller.xml"
        self.caller_plain.write_text(caller_scenario(None, 0))
        (workdir / "callee.xml").write_text(callee_scenario())
        (workdir / "register.xml").write_text(REGISTER)
        (workdir / "unregister.xml").write_text(REGISTER.replace("Expires: 3600", "Expires: 0"))
        self.procs: list[subprocess.Popen[bytes]] = []

    def _cmd(self, scenario: Path, port: int, target: Target, *args: str) -> list[str]:
        return ["sipp", "-sf", str(scenario), "-i", HOST, "-p", str(port), "-nostdin", "-mi", HOST,
                "-mp", str(free_port() // 2 * 2), *args, f"{HOST}:{target.port}"]

    @contextlib.contextmanager
    def callee(self, target: Target) -> Iterator[None]:
        """A SIPp registered as 200 that answers every call (and echoes the RTP) until closed."""
        port = free_port()
        work = Path(tempfile.mkdtemp(dir=self.dir))
        reg = subprocess.run(self._cmd(self.dir / "register.xml", port, target, "-m", "1", "-s", CALLEE,
                                       "-au", CALLEE, "-ap", CALLEE_PW, "-timeout", "10s"),
                             cwd=work, capture_output=True)
        if reg.returncode != 0:
            raise RuntimeError(f"{target.name}: REGISTER failed: {reg.stderr.decode()[-500:]}")
        proc = subprocess.Popen(self._cmd(self.dir / "callee.xml", port, target, "-rtp_echo", "-aa",
                                          "-max_socket", "5000"),
                                cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.3)
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            # Unregister: Asterisk keeps contacts across restarts (and takes 3 at most).
            subprocess.run(self._cmd(self.dir / "unregister.xml", port, target, "-m", "1", "-s", CALLEE,
                                     "-au", CALLEE, "-ap", CALLEE_PW, "-timeout", "10s"),
                           cwd=work, capture_output=True)

    def calls(self, target: Target, calls: int, in_flight: int, scenario: Path | None = None,
              rtt: bool = False, wait: bool = True) -> Run | subprocess.Popen[bytes]:
        work = Path(tempfile.mkdtemp(dir=self.dir))
        scenario = scenario or self.caller_plain
        rate = max(in_flight * 50, 100) if self.rate_cap else 1_000_000
        args = ["-s", CALLEE, "-au", CALLER, "-ap", CALLER_PW, "-m", str(calls), "-l", str(in_flight),
                "-r", str(rate), "-trace_stat", "-fd", "1", "-timeout", "120s", "-recv_timeout", "10000"]
        if rtt:
            args += ["-trace_msg"]
        started = time.monotonic()
        proc = subprocess.Popen(self._cmd(scenario, free_port(), target, *args, "-trace_err"), cwd=work,
                                stdout=subprocess.DEVNULL, stderr=open(work / "stderr.txt", "wb"))  # noqa: SIM115
        if not wait:
            return proc
        proc.wait(180)
        seconds = time.monotonic() - started
        ok, failed = _stat(work)
        if failed or not ok:
            errors = "".join(p.read_text(errors="replace")[:2500] for p in work.glob("*errors.log"))
            stderr = (work / "stderr.txt").read_text()[-1500:]
            print(f"  SIPp ({ok} ok, {failed} failed): {stderr} {errors}", flush=True)
        rtts: list[float] = []
        for path in work.glob("*_messages.log"):
            rtts += setup_times(path.read_text(errors="replace"))
        return Run(ok, failed, seconds, rtts)


def setup_times(log: str) -> list[float]:
    """From SIPp's message trace (-trace_msg, microsecond stamps): ms from each call's
    authenticated INVITE (CSeq 2) sent to its 200 received.  SIPp's own rtd counts in
    whole milliseconds of its scheduler clock, too coarse for a few ms."""
    sent: dict[str, float] = {}
    times: list[float] = []
    for block in log.split("----------------------------------------------- ")[1:]:
        stamp, _, rest = block.partition("\n")
        try:
            clock = time.mktime(time.strptime(stamp.strip()[:19], "%Y-%m-%d %H:%M:%S")) + float(
                "0." + stamp.strip().split(".")[1])
        except (ValueError, IndexError):
            continue
        lines = [line for line in rest.splitlines() if line.strip()]
        if len(lines) < 2:
            continue
        first = lines[1]
        call_id = next((x.split(":", 1)[1].strip() for x in lines if x.lower().startswith("call-id:")), "")
        cseq = next((x.split(":", 1)[1].strip() for x in lines if x.lower().startswith("cseq:")), "")
        if cseq != "2 INVITE":
            continue
        if "sent" in lines[0] and first.startswith("INVITE ") and call_id not in sent:
            sent[call_id] = clock
        elif "received" in lines[0] and first.startswith("SIP/2.0 200") and call_id in sent:
            times.append(1000 * (clock - sent.pop(call_id)))
    return times


def _stat(work: Path) -> tuple[int, int]:
    stat = next(work.glob("*_.csv"), None) or next(work.glob("*.csv"), None)
    if stat is None:
        return 0, 0
    rows = [line.split(";") for line in stat.read_text().splitlines() if line.strip()]
    head, last = rows[0], rows[-1]
    return int(last[head.index("SuccessfulCall(C)")]), int(last[head.index("FailedCall(C)")])


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# -- phases ---------------------------------------------------------------------------------
def burst(sipp: Sipp, target: Target, calls: int) -> None:
    with sipp.callee(target):
        for in_flight in (10, 50):
            run = sipp.calls(target, calls, in_flight)
            assert isinstance(run, Run)
            cps = run.ok / run.seconds if run.seconds else 0.0
            target.figures[f"cps{in_flight}"] = (cps, run.failed)
            print(f"  {target.name}: {calls} calls, {in_flight} in flight: {cps:.0f} calls/s, "
                  f"{run.failed} failed", flush=True)
        run = sipp.calls(target, 100, 1, rtt=True)
        assert isinstance(run, Run)
        target.figures["setup"] = (pct(run.rtt_ms, 0.5), pct(run.rtt_ms, 0.95))
        print(f"  {target.name}: call setup (authenticated INVITE to 200), 1 in flight: "
              f"p50 {pct(run.rtt_ms, 0.5):.2f} ms, p95 {pct(run.rtt_ms, 0.95):.2f} ms", flush=True)


def cpu(sipp: Sipp, target: Target, seconds: float) -> None:
    settle = 3.0
    hold_ms = int((settle + seconds + 2.0) * 1000)
    pcap = sipp.dir / "pcma.pcap"
    if not pcap.exists():
        write_pcap(pcap, hold_ms / 1000 + 1)
    scenario = sipp.dir / "caller_rtp.xml"
    scenario.write_text(caller_scenario(pcap, hold_ms))
    with sipp.callee(target):
        for n in (1, 4, 8):
            proc = sipp.calls(target, n, n, scenario=scenario, wait=False)
            assert isinstance(proc, subprocess.Popen)
            time.sleep(settle)
            pids = target.pids()
            window = measure(pids, seconds, 5)
            total = window.total(pids, "ns")
            line = f"  {target.name}: {n} call(s), RTP both ways: {total / n:.3f} % of a core per call " \
                   f"({total:.2f} % in all, {len(pids)} processes)"
            target.figures[f"cpu{n}"] = total / n
            if n == 8:
                pss = sum(memory_kib(p)[0] for p in pids if alive(p))
                rss = sum(memory_kib(p)[1] for p in pids if alive(p))
                target.figures["mem"] = (pss, rss)
                line += f"; PSS {pss / 1024:.1f} MB, RSS {rss / 1024:.1f} MB"
            print(line, flush=True)
            proc.wait(hold_ms / 1000 + 30)


def ratio(a: object, b: object) -> str:
    if isinstance(a, float) and isinstance(b, float) and b:
        return f"{a / b:.2f}x"
    return "-"


def report(targets: dict[str, Target]) -> None:
    print("\nSummary (one run, one machine; ratio = homepbx / anchor)")
    pairs = [("homepbx", "Asterisk 22"), ("homepbx edge-only", "Kamailio 5.6")]
    for ours, theirs in pairs:
        a, b = targets.get(ours), targets.get(theirs)
        if a is None:
            continue
        for key in ("cps10", "cps50"):
            fa = a.figures.get(key)
            fb = b.figures.get(key) if b else None
            if fa is None:
                continue
            text = f"  calls/s, {key[3:]} in flight: {ours} {fa[0]:.0f} ({fa[1]} failed)"  # type: ignore[index]
            if fb is not None:
                text += f", {theirs} {fb[0]:.0f} ({fb[1]} failed), {ratio(fa[0], fb[0])}"  # type: ignore[index]
            print(text)
    a, b = targets.get("homepbx"), targets.get("Asterisk 22")
    if a is not None:
        for n in (1, 4, 8):
            fa = a.figures.get(f"cpu{n}")
            fb = b.figures.get(f"cpu{n}") if b else None
            if fa is not None:
                text = f"  CPU per call at {n}: homepbx {fa:.3f} %"
                if fb is not None:
                    text += f", Asterisk {fb:.3f} %, {ratio(fa, fb)}"
                print(text)
        ma = a.figures.get("mem")
        mb = b.figures.get("mem") if b else None
        if ma is not None:
            text = f"  memory with 8 calls: homepbx PSS {ma[0] / 1024:.1f} MB"  # type: ignore[index]
            if mb is not None:
                text += f", Asterisk RSS {mb[1] / 1024:.1f} MB (PSS {mb[0] / 1024:.1f}), " \
                        f"{ratio(float(ma[0]), float(mb[1]))}"  # type: ignore[index]
            print(text)
    edge = targets.get("homepbx edge-only")
    if a is not None and edge is not None and "setup" in a.figures and "setup" in edge.figures:
        (p50, p95), (e50, e95) = a.figures["setup"], edge.figures["setup"]  # type: ignore[misc]
        print(f"  call setup added by the media worker: p50 {p50 - e50:+.2f} ms, p95 {p95 - e95:+.2f} ms "
              f"(anchored {p50:.2f}/{p95:.2f}, edge-only {e50:.2f}/{e95:.2f})")
    for t in targets.values():
        if "setup" in t.figures and t.name not in ("homepbx", "homepbx edge-only"):
            s50, s95 = t.figures["setup"]  # type: ignore[misc]
            print(f"  call setup {t.name}: p50 {s50:.2f} ms, p95 {s95:.2f} ms")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1000, help="calls per calls/s run (default 1000)")
    parser.add_argument("--edge-calls", type=int, default=5000,
                        help="calls per calls/s run of homepbx edge-only and Kamailio (default 5000: they run"
                             " about 5x faster, and a 1000-call run of 0.4 s mostly measured SIPp's start)")
    parser.add_argument("--seconds", type=float, default=10.0, help="CPU measuring window per step (default 10)")
    parser.add_argument("--only", default="homepbx,asterisk,edge,kamailio",
                        help="which of homepbx,asterisk,edge,kamailio to run (default all)")
    parser.add_argument("--uncapped", action="store_true",
                        help="no SIPp rate cap (-r): by default calls start at most 50/s per call in flight,"
                             " which both anchors reach at 10 in flight")
    parser.add_argument("--no-cpu", action="store_true", help="skip CPU per call and memory")
    parser.add_argument("--no-burst", action="store_true", help="skip calls/s and setup latency")
    parser.add_argument("--calls-per-worker", type=int, default=None,
                        help="homepbx's [media] calls_per_worker (default: the config's default, as many as the"
                             " pjsua2 build allows)")
    args = parser.parse_args(argv)
    if shutil.which("sipp") is None:
        print("skipped: sipp is not installed (Debian's sip-tester)")
        return
    wanted = set(args.only.split(","))
    print(f"media_vs_asterisk: {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="homepbx-vs-") as tmp:
        workdir = Path(tmp)
        sipp = Sipp(workdir, rate_cap=not args.uncapped)
        made: list[Target | str] = []
        if "homepbx" in wanted:
            made.append(homepbx(workdir, 64, args.calls_per_worker))
        if "asterisk" in wanted:
            made.append(asterisk())
        if "edge" in wanted:
            made.append(homepbx(workdir, 0))
        if "kamailio" in wanted:
            made.append(kamailio(workdir))
        targets: dict[str, Target] = {}
        for target in made:
            if isinstance(target, str):
                print(target, flush=True)
                continue
            print(f"{target.name} on {HOST}:{target.port}", flush=True)
            phases: list[Callable[[], None]] = []
            if target.name in ("homepbx", "Asterisk 22") and not args.no_cpu:
                phases.append(lambda t=target: cpu(sipp, t, args.seconds))  # type: ignore[misc]
            if not args.no_burst:
                calls = args.edge_calls if target.name in ("homepbx edge-only", "Kamailio 5.6") else args.calls
                phases.append(lambda t=target, n=calls: burst(sipp, t, n))  # type: ignore[misc]
            for phase in phases:  # each on a fresh start: a burst leaves warm workers behind
                target.start()
                try:
                    phase()
                except Exception as exc:  # one system's failure still leaves the others' figures
                    print(f"  {target.name}: failed: {exc!r}", flush=True)
                finally:
                    target.stop()
            targets[target.name] = target
        report(targets)


if __name__ == "__main__":
    main()
