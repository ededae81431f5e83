"""Tests for appliance.config (schema, located errors, round-trip edits) and appliance.fileio."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from appliance import config as config_module
from appliance.config import (
    Config,
    ConfigError,
    ListenAddress,
    UserConfig,
    fill_missing_passwords,
    load_config,
    parse_config,
    update_user,
)
from appliance.fileio import atomic_write

EXAMPLE = """\
# homepbx example
[server]
listen = ["0.0.0.0:5060"]   # all interfaces
realm = "home.arpa"
state_dir = "state"

[registration]
min_expires = 60
max_expires = 3600
default_expires = 600
qualify_interval = 30
qualify_timeout = 5

[control]
socket = ""
group = ""

[media]
max_calls = 8
min_idle = 1
rtp_ports = "10000-10999"

[feature_codes]
"*74" = "join"

[[users]]
number = "200"
name = "Family"
password = ""
one_number = false
max_devices = 3
max_outgoing_calls = 0
decline = "this_device"
ring_timeout = 30
"""


def write(tmp_path: Path, text: str, name: str = "homepbx.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(text: str, path: Path = Path("/etc/homepbx.toml")) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, path)
    return info.value


# --------------------------------------------------------------------------- defaults and values


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""))
    assert cfg.path == tmp_path / "homepbx.toml"
    assert cfg.server.listen == (ListenAddress("0.0.0.0", 5060),)
    assert cfg.server.realm == "home.arpa"
    assert cfg.server.state_dir == tmp_path / "state"
    assert cfg.server.digest_algorithms == ("SHA-256", "MD5")  # RFC 8760 order
    reg = cfg.registration
    assert (reg.min_expires, reg.max_expires, reg.default_expires) == (60, 3600, 600)
    assert (reg.qualify_interval, reg.qualify_timeout) == (30, 5)
    assert (cfg.control.socket, cfg.control.group) == ("", "")
    media = cfg.media
    assert (media.max_calls, media.min_idle, media.rtp_port_low, media.rtp_port_high) == (8, 1, 10000, 10999)
    assert media.calls_per_worker == 0  # as many as the pjsua2 build allows
    assert dict(cfg.feature_codes) == {
        "*74": "join", "*72": "forward_always", "*73": "forward_always_off", "*90": "forward_busy",
        "*91": "forward_busy_off", "*52": "forward_no_answer", "*53": "forward_no_answer_off",
        "*78": "dnd_on", "*79": "dnd_off", "*76": "dnd_toggle", "*8": "pickup", "**": "pickup_directed",
            "*97": "voicemail"}
    assert cfg.users == ()
    assert cfg.user("200") is None


def test_example_file_parses_to_the_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, EXAMPLE))
    empty = load_config(write(tmp_path, "", "empty.toml"))
    assert (cfg.server, cfg.registration, cfg.control, cfg.media) == (
        empty.server,
        empty.registration,
        empty.control,
        empty.media,
    )
    assert cfg.users == (UserConfig(number="200", name="Family"),)


def test_user_defaults_lookup_and_device_limit() -> None:
    cfg = parse_config(
        '[[users]]\nnumber = "200"\n\n[[users]]\nnumber = "201"\none_number = true\nmax_devices = 5\n',
        Path("/x/c.toml"),
    )
    first, second = cfg.users
    assert first == UserConfig(
        number="200",
        name="",
        password="",
        one_number=False,
        max_devices=3,
        max_outgoing_calls=0,
        decline="this_device",
        ring_timeout=30,
    )
    assert first.device_limit == 1  # max_devices only counts for one-number users
    assert second.device_limit == 5
    assert cfg.user("201") is second
    assert cfg.user("202") is None


def test_all_values_are_read() -> None:
    cfg = parse_config(
        """
[server]
listen = ["127.0.0.1:5070", "[::1]:5060", "localhost:5080", "[FE80::0001]:5062"]
realm = "pbx.example"
state_dir = "/var/lib/homepbx"
[registration]
min_expires = 30
max_expires = 7200
default_expires = 30
qualify_interval = 0
qualify_timeout = 2
[control]
socket = "/run/homepbx/control.sock"
group = "pbxadmin"
[media]
max_calls = 64
min_idle = 64
rtp_ports = "1024-65535"
[[users]]
number = "012345678901234"
name = "Grandma's phone"
password = "s3cret"
one_number = true
max_devices = 10
max_outgoing_calls = 2
decline = "all_devices"
ring_timeout = 600
""",
        Path("/etc/homepbx.toml"),
    )
    assert [str(a) for a in cfg.server.listen] == [
        "127.0.0.1:5070",
        "[::1]:5060",
        "localhost:5080",
        "[fe80::1]:5062",
    ]
    assert cfg.server.realm == "pbx.example"
    assert cfg.server.state_dir == Path("/var/lib/homepbx")
    assert cfg.registration.qualify_interval == 0
    assert cfg.registration.default_expires == 30
    assert cfg.control.socket == "/run/homepbx/control.sock"
    assert cfg.control.group == "pbxadmin"
    assert (cfg.media.max_calls, cfg.media.min_idle) == (64, 64)
    assert (cfg.media.rtp_port_low, cfg.media.rtp_port_high) == (1024, 65535)
    user = cfg.users[0]
    assert user.number == "012345678901234"
    assert (user.name, user.password, user.one_number) == ("Grandma's phone", "s3cret", True)
    assert (user.max_devices, user.max_outgoing_calls, user.decline, user.ring_timeout) == (
        10,
        2,
        "all_devices",
        600,
    )


def test_relative_state_dir_is_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    write(tmp_path / "etc", 'server.state_dir = "../var/state"\n')
    monkeypatch.chdir(tmp_path)
    cfg = load_config(Path("etc/homepbx.toml"))
    assert cfg.server.state_dir == tmp_path / "var" / "state"
    assert cfg.server.state_dir.is_absolute()


def test_feature_codes_may_be_empty_or_replaced() -> None:
    assert dict(parse_config("[feature_codes]\n", Path("c.toml")).feature_codes) == {}
    codes = parse_config('[feature_codes]\n"#1" = "join"\n"0*#9" = "join"\n', Path("c.toml")).feature_codes
    assert dict(codes) == {"#1": "join", "0*#9": "join"}


def test_config_is_immutable() -> None:
    cfg = parse_config('[[users]]\nnumber = "200"\n', Path("c.toml"))
    with pytest.raises(AttributeError):
        cfg.users = ()  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.feature_codes["*75"] = "join"  # type: ignore[index]


def test_listen_address_str() -> None:
    assert str(ListenAddress("192.0.2.1", 5060)) == "192.0.2.1:5060"
    assert str(ListenAddress("2001:db8::1", 5061)) == "[2001:db8::1]:5061"
    assert str(ListenAddress("localhost", 1)) == "localhost:1"


def test_users_as_inline_array_of_tables() -> None:
    cfg = parse_config('users = [{number = "200"}, {number = "201", name = "B"}]\n', Path("c.toml"))
    assert [u.number for u in cfg.users] == ["200", "201"]


# --------------------------------------------------------------------------- located errors

ERROR_CASES = [
    # (id, text, line, key, message fragment)
    ("unknown top-level key", 'realm = "x"\n', 1, "realm", "unknown key"),
    ("unknown table with hint", "[sever]\n", 1, "sever", "did you mean 'server'?"),
    ("unknown key in table", '[server]\nrealm = "x"\nlisten_on = []\n', 3, "server.listen_on", "unknown key"),
    (
        "unknown key in a user",
        '[[users]]\nnumber = "200"\n\n[[users]]\nnumber = "201"\npasswrd = "x"\n',
        6,
        "users[1].passwrd",
        "did you mean 'password'?",
    ),
    ("wrong type string", "[server]\nrealm = 5\n", 2, "server.realm", "must be a string, not an integer"),
    (
        "bool for int",
        "[media]\nmax_calls = true\n",
        2,
        "media.max_calls",
        "must be an integer, not a boolean",
    ),
    (
        "calls per worker beyond 16",
        "[media]\nmax_calls = 8\ncalls_per_worker = 17\n",
        3,
        "media.calls_per_worker",
        "between 0 and 16",
    ),
    (
        "float for int",
        "[media]\n\nmax_calls = 8.0\n",
        3,
        "media.max_calls",
        "must be an integer, not a float",
    ),
    (
        "int for bool",
        '[[users]]\nnumber = "1"\none_number = 1\n',
        3,
        "users[0].one_number",
        "must be a boolean",
    ),
    ("table is a value", "# c\nserver = 5\n", 2, "server", "must be a table, not an integer"),
    ("users is a table", '[users]\nnumber = "1"\n', 1, "users", "must be an array of tables"),
    ("user is not a table", 'users = ["200"]\n', 1, "users[0]", "must be a table, not a string"),
    (
        "missing number points at header",
        '[[users]]\nnumber = "200"\n\n# second\n[[users]]\nname = "x"\n',
        5,
        "users[1].number",
        "missing required key",
    ),
    (
        "duplicate number points at second",
        '[[users]]\nnumber = "200"\n[[users]]\nnumber = "201"\n[[users]]\nname = "a"\nnumber = "200"\n',
        7,
        "users[2].number",
        "duplicate number '200' (also users[0])",
    ),
    (
        "number as integer",
        "[[users]]\nnumber = 200\n",
        2,
        "users[0].number",
        'must be a string (number = "200")',
    ),
    ("number not digits", '[[users]]\nnumber = "20a"\n', 2, "users[0].number", "must be 1-15 digits"),
    ("number empty", '[[users]]\nnumber = ""\n', 2, "users[0].number", "must be 1-15 digits"),
    ("number too long", '[[users]]\nnumber = "1234567890123456"\n', 2, "users[0].number", "1-15 digits"),
    (
        "max_devices 0",
        '[[users]]\nnumber = "1"\nmax_devices = 0\n',
        3,
        "users[0].max_devices",
        "between 1 and 10",
    ),
    ("max_devices 11", '[[users]]\nnumber = "1"\nmax_devices = 11\n', 3, "users[0].max_devices", "not 11"),
    (
        "ring_timeout 4",
        '[[users]]\nnumber = "1"\nring_timeout = 4\n',
        3,
        "users[0].ring_timeout",
        "between 5 and 600",
    ),
    ("ring_timeout 601", '[[users]]\nnumber = "1"\nring_timeout = 601\n', 3, "users[0].ring_timeout", "600"),
    (
        "max_outgoing_calls negative",
        '[[users]]\nnumber = "1"\nmax_outgoing_calls = -1\n',
        3,
        "users[0].max_outgoing_calls",
        "at least 0",
    ),
    (
        "decline",
        '[[users]]\nnumber = "1"\ndecline = "nobody"\n',
        3,
        "users[0].decline",
        "this_device, all_devices",
    ),
    ("control chars in name", '[[users]]\nnumber = "1"\nname = "a\\nb"\n', 3, "users[0].name", "control"),
    ("listen without port", '[server]\nlisten = ["1.2.3.4"]\n', 2, "server.listen[0]", "missing port"),
    ("listen port 0", '[server]\nlisten = ["1.2.3.4:0"]\n', 2, "server.listen[0]", "from 1 to 65535"),
    ("listen port 70000", '[server]\nlisten = ["1.2.3.4:70000"]\n', 2, "server.listen[0]", "from 1 to 65535"),
    ("listen port not a number", '[server]\nlisten = ["1.2.3.4:sip"]\n', 2, "server.listen[0]", "port"),
    (
        "listen hostname",
        '[server]\nlisten = ["nothost:5060"]\n',
        2,
        "server.listen[0]",
        'IP address or "localhost"',
    ),
    ("listen empty host", '[server]\nlisten = [":5060"]\n', 2, "server.listen[0]", "IP address"),
    ("listen bad IPv4", '[server]\nlisten = ["1.2.3.256:5060"]\n', 2, "server.listen[0]", "IP address"),
    ("listen IPv6 without brackets", '[server]\nlisten = ["::1:5060"]\n', 2, "server.listen[0]", "brackets"),
    ("listen IPv6 without port", '[server]\nlisten = ["[::1]"]\n', 2, "server.listen[0]", "missing port"),
    (
        "listen IPv4 in brackets",
        '[server]\nlisten = ["[1.2.3.4]:5060"]\n',
        2,
        "server.listen[0]",
        "not an IPv6",
    ),
    ("listen unclosed bracket", '[server]\nlisten = ["[::1:5060"]\n', 2, "server.listen[0]", '"]"'),
    ("listen empty", "[server]\nlisten = []\n", 2, "server.listen", "at least one"),
    ("listen not array", '[server]\nlisten = "0.0.0.0:5060"\n', 2, "server.listen", "must be an array"),
    ("listen item not string", "[server]\nlisten = [5060]\n", 2, "server.listen[0]", "must be a string"),
    (
        "listen on several lines",
        '[server]\nlisten = [\n  "127.0.0.1:5060",  # lo\n  # none here\n  "0.0.0.0:0",\n]\n',
        5,
        "server.listen[1]",
        "from 1 to 65535",
    ),
    (
        "listen duplicate after normalising",
        '[server]\nlisten = ["[::1]:5060", "[0:0::1]:5060"]\n',
        2,
        "server.listen[1]",
        "duplicate address '[::1]:5060' (also server.listen[0])",
    ),
    (
        "digest algorithm unknown",
        '[server]\ndigest_algorithms = ["SHA-256", "SHA-512-256"]\n',
        2,
        "server.digest_algorithms[1]",
        "'SHA-512-256': unsupported: choose from SHA-256, MD5",
    ),
    (
        "digest algorithm twice",
        '[server]\ndigest_algorithms = ["md5", "MD5"]\n',
        2,
        "server.digest_algorithms[1]",
        "duplicate algorithm 'MD5' (also server.digest_algorithms[0])",
    ),
    ("digest algorithms empty", "[server]\ndigest_algorithms = []\n", 2, "server.digest_algorithms", "at least one"),
    ("digest algorithms not array", '[server]\ndigest_algorithms = "MD5"\n', 2, "server.digest_algorithms",
     "must be an array"),
    ("realm empty", '[server]\nrealm = ""\n', 2, "server.realm", "non-empty"),
    ("realm space", '[server]\nrealm = "my home"\n', 2, "server.realm", "whitespace"),
    ("realm quote", "[server]\nrealm = 'a\"b'\n", 2, "server.realm", "quotes"),
    ("state_dir empty", '[server]\nstate_dir = ""\n', 2, "server.state_dir", "non-empty"),
    ("min_expires 0", "[registration]\nmin_expires = 0\n", 2, "registration.min_expires", "at least 1"),
    (
        "min above default",
        "[registration]\nmin_expires = 1000\n",
        2,
        "registration.min_expires",
        "min_expires (1000) must not be greater than default_expires (600)",
    ),
    (
        "default above max",
        "[registration]\ndefault_expires = 4000\nmax_expires = 3000\n",
        2,
        "registration.default_expires",
        "default_expires (4000) must not be greater than max_expires (3000)",
    ),
    (
        "max below the default default_expires",
        "[registration]\nmax_expires = 300\n",
        2,
        "registration.max_expires",
        "default_expires (600) must not be greater than max_expires (300)",
    ),
    (
        "qualify_interval negative",
        "[registration]\nqualify_interval = -1\n",
        2,
        "registration.qualify_interval",
        "",
    ),
    (
        "qualify_timeout 0",
        "[registration]\nqualify_timeout = 0\n",
        2,
        "registration.qualify_timeout",
        "at least 1",
    ),
    ("control socket type", "[control]\nsocket = false\n", 2, "control.socket", "must be a string"),
    ("max_calls -1", "[media]\nmax_calls = -1\n", 2, "media.max_calls", "between 0 and 64"),
    ("max_calls 65", "[media]\nmax_calls = 65\n", 2, "media.max_calls", "between 0 and 64"),
    (
        "min_idle above max_calls",
        "[media]\nmax_calls = 2\nmin_idle = 3\n",
        3,
        "media.min_idle",
        "max_calls (2)",
    ),
    ("min_idle negative", "[media]\nmin_idle = -1\n", 2, "media.min_idle", "at least 0"),
    ("rtp_ports low below 1024", '[media]\nrtp_ports = "1000-2000"\n', 2, "media.rtp_ports", "LOW-HIGH"),
    ("rtp_ports equal", '[media]\nrtp_ports = "2000-2000"\n', 2, "media.rtp_ports", "LOW < HIGH"),
    ("rtp_ports reversed", '[media]\nrtp_ports = "3000-2000"\n', 2, "media.rtp_ports", "LOW-HIGH"),
    ("rtp_ports high", '[media]\nrtp_ports = "10000-65536"\n', 2, "media.rtp_ports", "65535"),
    ("rtp_ports spaces", '[media]\nrtp_ports = "10000 - 10999"\n', 2, "media.rtp_ports", "LOW-HIGH"),
    ("rtp_ports int", "[media]\nrtp_ports = 10000\n", 2, "media.rtp_ports", "must be a string"),
    ("feature code chars", '[feature_codes]\n"*7a" = "join"\n', 2, 'feature_codes."*7a"', "0-9 * #"),
    (
        "feature code long",
        '[feature_codes]\n"*12345678901234567" = "join"\n',
        2,
        'feature_codes."*12345678901234567"',
        "",
    ),
    (
        "feature service",
        '[feature_codes]\n"*74" = "park"\n',
        2,
        'feature_codes."*74"',
        "unknown service 'park'",
    ),
    ("feature service type", '[feature_codes]\n"*74" = 1\n', 2, 'feature_codes."*74"', "must be a string"),
    ("feature table type", 'feature_codes = "*74"\n', 1, "feature_codes", "must be a table"),
    (
        "feature code clashes with a user",
        '[feature_codes]\n"200" = "join"\n\n[[users]]\nnumber = "200"\n',
        2,
        "feature_codes.200",
        "number of a user",
    ),
    # the line scanner copes with TOML's other ways of writing keys
    ("dotted key", 'server.realm = "a b"\n', 1, "server.realm", "whitespace"),
    ("quoted key", '[server]\n"realm" = 1\n', 2, "server.realm", "must be a string"),
    ("dotted header", "[server]\n[media]\n# x\n\nmax_calls = 99\n", 5, "media.max_calls", ""),
    (
        "inline user table",
        'users = [\n  {number = "1"},\n  {number = "2", max_devices = true},\n]\n',
        3,
        "users[1].max_devices",
        "must be an integer",
    ),
    (
        "multi-line strings are not headers",
        '[control]\nsocket = """\n[server]\nfoo = 1\n"""\n'
        "group = '''\n[media]\n'''\n[server]\nfoo = 1\n",
        10,
        "server.foo",
        "unknown key",
    ),
    (
        "strings with brackets, hashes and escaped quotes",
        '[control]\nsocket = "a]#\\"b["  # ] [\ngroup = "x"\n[server]\nrealm = "x"\nbad = 1\n',
        6,
        "server.bad",
        "unknown key",
    ),
]


@pytest.mark.parametrize(
    ("text", "line", "key", "fragment"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
)
def test_errors_name_line_and_key(text: str, line: int, key: str, fragment: str) -> None:
    err = error_of(text)
    assert (err.path, err.line, err.key) == (Path("/etc/homepbx.toml"), line, key), str(err)
    assert fragment in err.message
    assert str(err) == f"/etc/homepbx.toml:{line}: {key}: {err.message}"


def test_qualify_interval_zero_disables() -> None:
    assert (
        parse_config("[registration]\nqualify_interval = 0\n", Path("c.toml")).registration.qualify_interval
        == 0
    )


def test_expires_constraint_blames_the_key_that_is_set() -> None:
    # Only default_expires set, below the default min_expires: default_expires is at fault.
    err = error_of("[registration]\n\ndefault_expires = 10\n")
    assert (err.line, err.key) == (3, "registration.default_expires")


def test_syntax_error_has_parser_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nrealm = "x"\nlisten = [\n  "a",\n  = 3\n]\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert (err.path, err.line, err.key) == (path, 5, "")
    assert err.message.startswith("invalid TOML: ")
    assert str(err) == f"{path}:5: {err.message}"


def test_syntax_error_duplicate_key() -> None:
    err = error_of('[server]\nrealm = "a"\nrealm = "b"\n')
    assert (err.line, err.key) == (3, "")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert (err.path, err.line, err.key) == (path, None, "")
    assert str(err) == f"{path}: {err.message}"
    assert "cannot read" in err.message


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(b'[server]\nrealm = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.line, info.value.key) == (2, "")


def test_config_error_format_and_pickle() -> None:
    import pickle

    err = ConfigError(Path("/c.toml"), None, "users[0].name", "bad")
    assert str(err) == "/c.toml: users[0].name: bad"
    err = ConfigError(Path("/c.toml"), 7, "server.realm", "bad")
    assert str(err) == "/c.toml:7: server.realm: bad"
    again = pickle.loads(pickle.dumps(err))
    assert (again.path, again.line, again.key, again.message) == (err.path, 7, "server.realm", "bad")


# --------------------------------------------------------------------------- fill_missing_passwords

FILL_SOURCE = """\
# Household phones
[server]
realm = "home.arpa"   # keep


# Kitchen: password to be generated
[[users]]
number = "200"
password = ""   # generated at first start
name = "Kitchen"

[[users]]
number = "201"
password = 'already-set'

# No password key at all
[[users]]
number = "202"
# trailing comment

[[users]]
number = "203"
"""


def test_fill_missing_passwords_keeps_the_layout(tmp_path: Path) -> None:
    path = write(tmp_path, FILL_SOURCE)
    os.chmod(path, 0o640)
    inode = path.stat().st_ino

    assert fill_missing_passwords(path) == ["200", "202", "203"]

    cfg = load_config(path)
    passwords = {u.number: u.password for u in cfg.users}
    assert passwords["201"] == "already-set"
    generated = [passwords[n] for n in ("200", "202", "203")]
    assert len(set(generated)) == 3
    for password in generated:
        assert len(password) >= 16
        assert re.fullmatch(r"[A-Za-z0-9_-]+", password)

    # Byte-for-byte the same apart from the password values (and the added keys).
    text = path.read_text(encoding="utf-8")
    restored = text.replace(passwords["200"], "")
    restored = restored.replace(f'password = "{passwords["202"]}"\n', "")
    restored = restored.replace(f'password = "{passwords["203"]}"\n', "")
    assert restored == FILL_SOURCE
    assert '# trailing comment\npassword = "' in text  # added inside user 202's table

    # Atomic: a new file took the old one's place, nothing left behind, mode kept.
    assert path.stat().st_ino != inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["homepbx.toml"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o640

    # Nothing more to do the second time.
    assert fill_missing_passwords(path) == []


def test_fill_missing_passwords_inline_users(tmp_path: Path) -> None:
    path = write(tmp_path, 'users = [{number = "200"}, {number = "201", password = "x"}]  # inline\n')
    assert fill_missing_passwords(path) == ["200"]
    cfg = load_config(path)
    assert len(cfg.users[0].password) >= 16
    assert cfg.users[1].password == "x"
    assert path.read_text().endswith("]  # inline\n")


def test_fill_missing_passwords_does_not_write_when_nothing_to_do(tmp_path: Path) -> None:
    path = write(tmp_path, '[[users]]\nnumber = "200"\npassword = "x"\n')
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    before = path.stat()
    assert fill_missing_passwords(path) == []
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_fill_missing_passwords_refuses_an_invalid_file(tmp_path: Path) -> None:
    source = '[[users]]\nnumber = "200"\nmax_devices = 0\n'
    path = write(tmp_path, source)
    with pytest.raises(ConfigError) as info:
        fill_missing_passwords(path)
    assert (info.value.line, info.value.key) == (3, "users[0].max_devices")
    assert path.read_text() == source


# --------------------------------------------------------------------------- update_user

UPDATE_SOURCE = """\
# Phones
[[users]]
number = "200"
name = "Kitchen"   # by the fridge
max_devices = 3

# Upstairs
[[users]]
number = "201"
ring_timeout = 20  # short
"""


def test_update_user_keeps_comments(tmp_path: Path) -> None:
    path = write(tmp_path, UPDATE_SOURCE)
    cfg = update_user(path, "200", {"max_devices": 5, "one_number": True, "name": "Hall"})
    assert isinstance(cfg, Config)
    user = cfg.user("200")
    assert user is not None
    assert (user.name, user.max_devices, user.one_number, user.device_limit) == ("Hall", 5, True, 5)
    assert load_config(path) == cfg
    assert path.read_text() == UPDATE_SOURCE.replace('"Kitchen"', '"Hall"').replace(
        "max_devices = 3\n", "max_devices = 5\none_number = true\n"
    )


def test_update_user_adds_absent_key_to_the_right_user(tmp_path: Path) -> None:
    path = write(tmp_path, UPDATE_SOURCE)
    cfg = update_user(path, "201", {"decline": "all_devices", "password": "pw", "ring_timeout": 45})
    second = cfg.user("201")
    assert second is not None
    assert (second.decline, second.password, second.ring_timeout) == ("all_devices", "pw", 45)
    assert cfg.user("200") == load_config(write(tmp_path, UPDATE_SOURCE, "orig.toml")).user("200")
    assert "ring_timeout = 45  # short\n" in path.read_text()


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"max_devices": 0}, "users[0].max_devices"),
        ({"max_devices": True}, "users[0].max_devices"),
        ({"ring_timeout": 5, "decline": "nobody"}, "users[0].decline"),
        ({"name": 5}, "users[0].name"),
        ({"number": "300"}, "users[0].number"),
        ({"colour": "red"}, "users[0].colour"),
        ({"name": object()}, "users[0].name"),
    ],
)
def test_update_user_refuses_invalid_changes_and_writes_nothing(
    tmp_path: Path, changes: dict[str, object], key: str
) -> None:
    path = write(tmp_path, UPDATE_SOURCE)
    before = path.stat()
    with pytest.raises(ConfigError) as info:
        update_user(path, "200", changes)
    assert info.value.key == key
    assert info.value.path == path
    assert path.read_text() == UPDATE_SOURCE
    assert path.stat().st_ino == before.st_ino
    assert sorted(p.name for p in tmp_path.iterdir()) == ["homepbx.toml"]


def test_update_user_unknown_number(tmp_path: Path) -> None:
    path = write(tmp_path, UPDATE_SOURCE)
    with pytest.raises(ConfigError) as info:
        update_user(path, "999", {"name": "x"})
    assert info.value.key == "users"
    assert info.value.message.startswith("no user with number")
    assert path.read_text() == UPDATE_SOURCE


def test_update_user_without_change_does_not_write(tmp_path: Path) -> None:
    path = write(tmp_path, UPDATE_SOURCE)
    inode = path.stat().st_ino
    cfg = update_user(path, "200", {})
    assert cfg == load_config(path)
    assert path.stat().st_ino == inode


# --------------------------------------------------------------------------- atomic_write


def test_atomic_write_new_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    atomic_write(path, "héllo")
    assert path.read_bytes() == "héllo".encode()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_atomic_write_keeps_mode_or_uses_given_mode(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    atomic_write(path, b"newer", mode=0o600)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml"]


def test_atomic_write_failure_keeps_old_file_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(b"old")

    def broken_replace(src: object, dst: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml"]


def test_atomic_write_through_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real.toml"
    real.write_bytes(b"old")
    link = tmp_path / "link.toml"
    link.symlink_to(real)
    atomic_write(link, b"new")
    assert link.is_symlink()
    assert real.read_bytes() == b"new"


def test_module_exports() -> None:
    assert set(config_module.__all__) >= {"Config", "ConfigError", "load_config", "update_user"}


def test_media_workers_can_be_turned_off(tmp_path: Path) -> None:
    cfg = parse_config("[media]\nmax_calls = 0\n", tmp_path / "c.toml")
    assert (cfg.media.max_calls, cfg.media.min_idle) == (0, 0)


def test_digest_algorithms_order_kept_and_case_normalised(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[server]\ndigest_algorithms = ["md5", "sha-256"]\n'))
    assert cfg.server.digest_algorithms == ("MD5", "SHA-256")


# --------------------------------------------------------------------------- trunks

TRUNK = """\
[[users]]
number = "200"
caller_id = "+4930123456"

[[users]]
number = "201"

[[trunks]]
name = "provider"
server = "sip.provider.example"
username = "4930123456"
password = "pw"
incoming = { "4930123456" = "200", "*" = "201" }
"""


def test_trunk_defaults_and_values() -> None:
    config = parse_config(TRUNK, Path("c.toml"))
    (trunk,) = config.trunks
    assert (trunk.host, trunk.port, trunk.transport, trunk.register, trunk.expires) == (
        "sip.provider.example", None, "udp", True, 600)
    assert (trunk.max_channels, trunk.outgoing_prefix, trunk.keepalive_interval, trunk.auth_user) == (
        2, "0", 25, "4930123456")
    assert dict(trunk.incoming) == {"4930123456": "200", "*": "201"}
    assert config.user("200").caller_id == "+4930123456"  # type: ignore[union-attr]
    assert config.emergency_numbers == ("112", "110", "911")
    assert parse_config("", Path("c.toml")).trunks == ()
    full = TRUNK + ('auth_username = "auth"\ntransport = "TCP"\nregister = false\nexpires = 300\n'
                    'max_channels = 4\noutgoing_prefix = ""\nexternal_address = "203.0.113.5"\n'
                    'keepalive_interval = 0\n')
    (trunk,) = parse_config(full.replace("sip.provider.example", "[2001:db8::1]:5070"), Path("c.toml")).trunks
    assert (trunk.host, trunk.port, trunk.auth_user, trunk.transport, trunk.register, trunk.expires) == (
        "2001:db8::1", 5070, "auth", "tcp", False, 300)
    assert (trunk.max_channels, trunk.outgoing_prefix, trunk.external_address, trunk.keepalive_interval) == (
        4, "", "203.0.113.5", 0)


TRUNK_ERRORS = [
    ('"*" = "201"', '"*" = "299"', 13, 'trunks[0].incoming."*"', "'299' is not the number of a user"),
    ('"*" = "201"', '"abc" = "201"', 13, "trunks[0].incoming.abc", "must be digits"),
    ("sip.provider.example", "sip provider", 10, "trunks[0].server", "host name or IP address"),
    ("sip.provider.example", "sip.provider.example:0", 10, "trunks[0].server", "port must be"),
    ('password = "pw"', 'password = ""', 12, "trunks[0].password", "non-empty"),
    ('password = "pw"\n', "", 8, "trunks[0].password", "missing required key"),
    ('name = "provider"', 'name = "my provider"', 9, "trunks[0].name", "must be 1-32"),
    ('username = "4930123456"', 'username = "a b"', 11, "trunks[0].username", "no spaces"),
    ('password = "pw"', 'password = "pw"\ntransport = "tls"', 13, "trunks[0].transport", "udp, tcp"),
    ('password = "pw"', 'password = "pw"\nexpires = 10', 13, "trunks[0].expires", "between 60 and 86400"),
    ('password = "pw"', 'password = "pw"\noutgoing_prefix = "2"', 13, "trunks[0].outgoing_prefix",
     "extension or feature code '200' starts with it"),
    ('password = "pw"', 'password = "pw"\nexternal_address = "router"', 13, "trunks[0].external_address",
     "must be an IP address"),
    ('password = "pw"', 'password = "pw"\nregistr = true', 13, "trunks[0].registr", "did you mean 'register'"),
    ('caller_id = "+4930123456"', 'caller_id = "030-123"', 3, "users[0].caller_id", "must be a phone number"),
    ('number = "201"', 'number = "112"', 6, "users[1].number", "is an emergency number"),
]


@pytest.mark.parametrize(("old", "new", "line", "key", "fragment"), TRUNK_ERRORS)
def test_trunk_errors_name_line_and_key(old: str, new: str, line: int, key: str, fragment: str) -> None:
    assert old in TRUNK
    err = error_of(TRUNK.replace(old, new))
    assert (err.line, err.key) == (line, key), str(err)
    assert fragment in err.message, str(err)


def test_two_trunks_need_their_own_names_and_prefixes() -> None:
    second = TRUNK[TRUNK.index("[[trunks]]"):]
    err = error_of(TRUNK + "\n" + second)
    assert (err.key, err.line) == ("trunks[1].name", 16) and "duplicate trunk name" in err.message
    err = error_of(TRUNK + "\n" + second.replace('"provider"', '"other"'))
    assert err.key == "trunks[1].outgoing_prefix" and "also the prefix of trunks[0]" in err.message


def test_emergency_numbers_replaced_and_checked() -> None:
    config = parse_config('emergency_numbers = ["999"]\n[[users]]\nnumber = "112"\n', Path("c.toml"))
    assert config.emergency_numbers == ("999",)
    err = error_of('emergency_numbers = ["999", "1x"]\n')
    assert (err.line, err.key) == (1, "emergency_numbers[1]") and "2-6 digits" in err.message
    err = error_of('emergency_numbers = ["112"]\n[[users]]\nnumber = "112"\n')
    assert (err.line, err.key) == (3, "users[0].number")


def test_history_bounds_defaults_and_errors_with_file_and_line(tmp_path: Path) -> None:
    base = '[server]\nlisten = ["127.0.0.1:5060"]\n'
    config = parse_config(base, tmp_path / "config.toml")
    assert (config.history.max_days, config.history.max_rows) == (365, 100_000)
    config = parse_config(base + "[history]\nmax_days = 30\nmax_rows = 0\n", tmp_path / "config.toml")
    assert (config.history.max_days, config.history.max_rows) == (30, 0)
    with pytest.raises(ConfigError) as err:
        parse_config(base + "[history]\nmax_days = 7\nmax_rows = -1\n", tmp_path / "config.toml")
    assert str(err.value).startswith(f"{tmp_path / 'config.toml'}:5: history.max_rows:")
    with pytest.raises(ConfigError) as err:
        parse_config(base + "[history]\nmax_dayz = 7\n", tmp_path / "config.toml")
    assert "history.max_dayz: unknown key (did you mean 'max_days'?)" in str(err.value)
