"""The control socket: protocol, commands and their errors, against the real daemon.

The last tests drive a ControlServer in-process (a real Daemon, not started) to make a
client fall behind on purpose, which a real daemon on loopback will not do on demand.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.config import control_socket_path as socket_path
from appliance.config import load_config
from appliance.control import ControlServer
from appliance.daemon import Daemon as InProcessDaemon
from tests.support.control import ControlConn, control_block
from tests.support.pbx import Daemon, user_block, write_config
from tests.support.ports import free_port
from tests.support.rawsip import RawClient

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

COMMENTED_USER = (
    "# The family: several handsets ring together.\n"
    "[[users]]\n"
    'number = "200"\n'
    'name = "Family"\n'
    'password = "secret"\n'
    "one_number = true       # keep this comment\n"
    "max_devices = 2\n"
    "max_outgoing_calls = 1  # and this one\n"
)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    port = free_port()
    config = write_config(tmp_path, port, [COMMENTED_USER, user_block("100")], extra=control_block())
    pbx = Daemon(config, port).start()
    yield pbx
    pbx.stop()


def connect(pbx: Daemon) -> ControlConn:
    return ControlConn(pbx.config.parent / "ctl.sock")


def test_snapshot_on_connect_socket_mode_and_peer_uid_logged(daemon: Daemon) -> None:
    path = daemon.config.parent / "ctl.sock"
    assert stat.S_IMODE(path.stat().st_mode) == 0o660
    with connect(daemon) as conn:
        snap = conn.snapshot
        assert snap["protocol"] == 1
        assert snap["reason"] == "connect"
        assert [n["number"] for n in snap["numbers"]] == ["200", "100"]
        family = snap["numbers"][0]
        assert (family["name"], family["one_number"], family["max_devices"]) == ("Family", True, 2)
        assert snap["calls"] == []
        assert conn.command("ping") == {"id": 1, "reply": "ok"}
    daemon.wait_log(rf"event=control_connected client=\d+ peer_uid={os.getuid()} ")


def test_set_user_applies_live_saves_with_comments_and_emits_config_changed(daemon: Daemon) -> None:
    phone = RawClient(daemon.port)
    try:
        assert phone.register("200", "secret").status == 200
        with connect(daemon) as conn:
            reply = conn.command("set_user", number="200", changes={"max_devices": 3, "max_outgoing_calls": 0})
            assert reply["reply"] == "ok", reply
            assert reply["user"]["max_devices"] == 3
            changed = next(m for m in conn.seen if m.get("event") == "config_changed")
            family = next(n for n in changed["numbers"] if n["number"] == "200")
            assert family["max_devices"] == 3 and family["max_outgoing_calls"] == 0
            assert len(family["devices"]) == 1  # no registration lost
        text = daemon.config.read_text()
        assert "max_devices = 3\n" in text
        assert "max_outgoing_calls = 0  # and this one\n" in text
        assert "one_number = true       # keep this comment\n" in text
        assert "# The family: several handsets ring together.\n" in text
        assert load_config(daemon.config).user("200").max_devices == 3  # type: ignore[union-attr]
        daemon.wait_log(r"event=control_command .*cmd=set_user number=200 .*result=ok")
    finally:
        phone.close()


def test_one_number_off_refuses_a_second_device_live(daemon: Daemon) -> None:
    phones = [RawClient(daemon.port), RawClient(daemon.port), RawClient(daemon.port)]
    try:
        assert phones[0].register("200", "secret").status == 200
        assert phones[1].register("200", "secret").status == 200
        assert phones[2].register("200", "secret").status == 403  # max_devices = 2
        with connect(daemon) as conn:
            assert conn.command("set_user", number="200", changes={"max_devices": 3})["reply"] == "ok"
        assert phones[2].register("200", "secret").status == 200  # no restart needed
    finally:
        for phone in phones:
            phone.close()


@pytest.mark.parametrize(
    ("command", "field", "message"),
    [
        ({"cmd": "set_user", "number": "200", "changes": {"max_devices": 11}}, "max_devices",
         "must be between 1 and 10, not 11"),
        ({"cmd": "set_user", "number": "200", "changes": {"max_devices": "3"}}, "max_devices",
         "must be an integer, not a string"),
        ({"cmd": "set_user", "number": "200", "changes": {"one_number": 1}}, "one_number",
         "must be a boolean (true or false), not an integer"),
        ({"cmd": "set_user", "number": "200", "changes": {"max_outgoing_calls": -1}}, "max_outgoing_calls",
         "must be at least 0, not -1"),
        ({"cmd": "set_user", "number": "200", "changes": {"password": "x"}}, "password",
         "not a field that can be set here"),
        ({"cmd": "set_user", "number": "200", "changes": {"max_devices": None}}, "max_devices",
         "must be a single value, not null"),
        ({"cmd": "set_user", "number": "200", "changes": {}}, "changes", "missing"),
        ({"cmd": "set_user", "number": "999", "changes": {"max_devices": 2}}, "number",
         "no user with number '999'"),
        ({"cmd": "set_user", "changes": {"max_devices": 2}}, "number", "missing"),
        ({"cmd": "show_password", "number": 200}, "number", "missing"),
        ({"cmd": "launch"}, "cmd", "unknown command 'launch'"),
        ({"number": "200"}, "cmd", "missing"),
    ],
)
def test_bad_commands_name_the_field_and_write_nothing(
    daemon: Daemon, command: dict[str, object], field: str, message: str
) -> None:
    before = daemon.config.read_bytes()
    with connect(daemon) as conn:
        conn.send_raw((json.dumps({"id": "req-7", **command}) + "\n").encode())
        reply = conn.reply("req-7")
        assert reply["reply"] == "error"
        assert reply["field"] == field
        assert message in reply["message"]
        assert not any(m.get("event") == "config_changed" for m in conn.seen)
        assert conn.command("ping")["reply"] == "ok"  # the connection survives a bad command
    assert daemon.config.read_bytes() == before


def test_lines_that_are_not_commands(daemon: Daemon) -> None:
    with connect(daemon) as conn:
        conn.send_raw(b"hello\n")
        reply = conn.reply(None)
        assert (reply["reply"], reply["field"]) == ("error", "line")
        assert "not JSON" in reply["message"]
        conn.send_raw(b"[1, 2]\n")
        assert conn.reply(None)["message"] == "must be a JSON object"
        conn.send_raw(b"\n")  # blank lines are ignored
        assert conn.command("ping")["reply"] == "ok"


def test_show_password_and_reload(daemon: Daemon) -> None:
    with connect(daemon) as conn:
        reply = conn.command("show_password", number="200")
        assert (reply["reply"], reply["password"]) == ("ok", "secret")
        daemon.wait_log(r"event=password_shown .*number=200")
        assert not daemon.log_matches("secret")  # the password itself is never logged

        good = daemon.config.read_text().replace('name = "Family"', 'name = "The Family"')
        daemon.config.write_text(good)
        assert conn.command("reload")["reply"] == "ok"
        changed = [m for m in conn.seen if m.get("event") == "config_changed"][-1]
        assert any(n["name"] == "The Family" for n in changed["numbers"])

        daemon.config.write_text(good.replace("max_devices = 2", 'max_devices = "two"'))
        reply = conn.command("reload")
        assert reply["reply"] == "error"
        assert reply["field"] == "max_devices"
        assert reply["key"] == "users[0].max_devices"
        assert "must be an integer" in reply["message"]
        # The last good config stays: the daemon still has the name from the good reload.
        assert conn.command("snapshot")["snapshot"]["numbers"][0]["name"] == "The Family"


def test_vanished_clients_do_not_disturb_the_daemon(daemon: Daemon) -> None:
    for _ in range(5):
        raw = socket.socket(socket.AF_UNIX)
        raw.connect(str(daemon.config.parent / "ctl.sock"))
        raw.sendall(b'{"id": 1, "cmd": "ping"}\n')
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        raw.close()  # reset, without reading anything
    phone = RawClient(daemon.port)
    try:
        assert phone.register("200", "secret").status == 200
    finally:
        phone.close()
    with connect(daemon) as conn:
        assert len(conn.snapshot["numbers"][0]["devices"]) == 1
    assert daemon.alive()


def test_stale_socket_replaced_live_socket_kept(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, port, [user_block("200")], extra=control_block())
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "ctl.sock"))  # bound, never listening: what a killed daemon leaves
    stale.close()
    first = Daemon(config, port).start()
    try:
        with connect(first) as conn:
            assert conn.snapshot["numbers"][0]["number"] == "200"
        # A second daemon (another port, same socket) must not steal the first one's socket.
        other_dir = tmp_path / "other"
        other_dir.mkdir()
        other_port = free_port()
        other = write_config(other_dir, other_port, [user_block("300")],
                             extra=control_block(str(tmp_path / "ctl.sock")))
        second = Daemon(other, other_port).start()
        second.allow_errors("event=control_failed")
        try:
            second.wait_log(r"event=control_failed .*served by another running daemon")
            with connect(first) as conn:
                assert conn.snapshot["numbers"][0]["number"] == "200"
        finally:
            second.stop()
    finally:
        first.stop()


def test_default_socket_paths(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, 5099, [])
    config = load_config(config_path)
    assert socket_path(config, {"RUNTIME_DIRECTORY": "/run/homepbx"}) == Path("/run/homepbx/control.sock")
    assert socket_path(config, {"XDG_RUNTIME_DIR": "/run/user/1000"}) == Path("/run/user/1000/homepbx/control.sock")
    assert socket_path(config, {}) == config.server.state_dir / "control.sock"
    config_path.write_text(config_path.read_text() + control_block("run/pbx.sock"))
    assert socket_path(load_config(config_path), {"RUNTIME_DIRECTORY": "/x"}) == tmp_path / "run/pbx.sock"


# -- in-process: a client that falls behind ----------------------------------------------------
def _in_process(tmp_path: Path, body: Callable[[InProcessDaemon, ControlServer, Path], object]) -> None:
    config_path = write_config(tmp_path, free_port(), [user_block("200")], extra=control_block())
    edge = InProcessDaemon(load_config(config_path), config_path)

    async def run() -> None:
        server = ControlServer(edge.state, edge.settings, edge, config_path, queue_limit=50)
        await server.start()
        try:
            result = body(edge, server, tmp_path / "ctl.sock")
            if asyncio.iscoroutine(result):
                await result
        finally:
            await server.stop()

    asyncio.run(run())


def test_a_client_that_falls_behind_gets_a_fresh_snapshot(tmp_path: Path) -> None:
    async def body(edge: InProcessDaemon, server: ControlServer, path: Path) -> None:
        reader, writer = await asyncio.open_unix_connection(str(path))
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        while not server._clients:  # the server has taken the connection
            await asyncio.sleep(0.01)
        # The client reads nothing, not even its first snapshot, while the daemon emits far
        # more than its queue holds.
        started = time.perf_counter()
        for i in range(20000):
            edge.state.emit({"event": "device_refreshed", "device": {"id": f"d{i}", "pad": "x" * 200}})
        assert time.perf_counter() - started < 2.0  # never waits for the client
        await asyncio.sleep(0.1)
        client = next(iter(server._clients.values()))
        assert client.events_pending <= 50  # bounded
        messages = []
        while True:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            message = json.loads(line)
            messages.append(message)
            if message.get("reason") == "resync":
                break
        assert messages[0]["event"] == "snapshot"
        assert len(messages) < 20000  # events were dropped in favour of the snapshot
        # After the resync the client follows live events again, and nothing stale comes first.
        edge.state.emit({"event": "config_changed"})
        again = json.loads(await asyncio.wait_for(reader.readline(), 5.0))
        assert again["event"] == "config_changed" and again["numbers"][0]["number"] == "200"
        writer.close()

    _in_process(tmp_path, body)
