"""The homepbx configuration file: schema, validation and round-trip editing.

The file is TOML. It is read with :mod:`tomllib` (strict, and its syntax errors
carry line numbers) and edited with :mod:`tomlkit` so that comments and layout
written by the owner survive when the daemon stores generated passwords or a
user's settings are changed. Every validation error names the file, the line
and the dotted key, because the person fixing it is looking at a text editor.
"""

from __future__ import annotations

import bisect
import datetime
import difflib
import ipaddress
import json
import os
import re
import secrets
import string
import tomllib
from collections.abc import Callable, Collection, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import tomlkit
import tomlkit.exceptions
import tomlkit.items

from appliance.fileio import atomic_write
from appliance.sip.auth import ALGORITHMS as DIGEST_ALGORITHMS
from appliance.sip.errors import SipSyntaxError
from appliance.sip.headers import parse_name_addr

T = TypeVar("T")

__all__ = [
    "DECLINE_MODES",
    "FEATURE_SERVICES",
    "Config",
    "ConfigError",
    "ControlConfig",
    "ListenAddress",
    "MediaConfig",
    "RegistrationConfig",
    "ServerConfig",
    "TrunkConfig",
    "UserConfig",
    "fill_missing_passwords",
    "load_config",
    "parse_config",
    "update_user",
]

FEATURE_SERVICES: tuple[str, ...] = (
    "join", "forward_always", "forward_always_off", "forward_busy", "forward_busy_off", "forward_no_answer",
    "forward_no_answer_off", "dnd_on", "dnd_off", "dnd_toggle", "pickup", "pickup_directed", "voicemail",
)
"""Services a feature code may name."""
PREFIX_SERVICES: frozenset[str] = frozenset({"forward_always", "forward_busy", "forward_no_answer",
                                              "pickup_directed"})
"""Services that take a number: their code is a prefix, the digits dialled after it are the number."""
FORWARD_FIELDS: tuple[str, ...] = ("forward_always", "forward_busy", "forward_no_answer", "forward_unreachable")
"""A user's forwarding targets, one per condition ("" = off)."""

VOICEMAIL_FIELDS: tuple[str, ...] = ("voicemail", "voicemail_after", "voicemail_on_busy", "voicemail_on_dnd",
                                      "voicemail_max_seconds")
"""A user's answering machine settings."""

DECLINE_MODES: tuple[str, ...] = ("this_device", "all_devices")
"""Values of a user's ``decline`` setting."""

USER_EDITABLE_FIELDS = frozenset(
    {"name", "one_number", "max_devices", "max_outgoing_calls", "decline", "ring_timeout", "password",
     *FORWARD_FIELDS, "no_answer_after", "dnd", "dnd_devices", *VOICEMAIL_FIELDS}
)
"""Fields :func:`update_user` may change (``number`` is the user's identity)."""

_DEFAULT_FEATURE_CODES = {
    "*74": "join",
    "*72": "forward_always", "*73": "forward_always_off",
    "*90": "forward_busy", "*91": "forward_busy_off",
    "*52": "forward_no_answer", "*53": "forward_no_answer_off",
    "*78": "dnd_on", "*79": "dnd_off", "*76": "dnd_toggle",
    "*8": "pickup", "**": "pickup_directed",
    "*97": "voicemail",
}
DEFAULT_EMERGENCY_NUMBERS: tuple[str, ...] = ("112", "110", "911")
"""Numbers that are never refused and never an extension (EU, Germany, North America)."""
TRUNK_TRANSPORTS: tuple[str, ...] = ("udp", "tcp")
_TRUNK_KEYS = ("name", "server", "username", "password", "auth_username", "transport", "register", "expires",
               "max_channels", "incoming", "outgoing_prefix", "external_address", "keepalive_interval")
_PASSWORD_BYTES = 18  # token_urlsafe -> 24 characters, 144 bits

_TCP_KEYS = ("tcp_max_connections", "tcp_max_per_address", "tcp_header_timeout", "tcp_idle_timeout")

_Key = tuple[str | int, ...]
"""A key path inside the document, e.g. ("users", 2, "max_devices")."""


class ConfigError(Exception):
    """An unusable config file, located as precisely as possible for a human editor."""

    def __init__(self, path: Path, line: int | None, key: str, message: str) -> None:
        super().__init__(path, line, key, message)
        self.path = path
        self.line = line
        self.key = key
        self.message = message

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else f"{self.path}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class ListenAddress:
    """One SIP listening socket; ``host`` is a normalised IP literal or "localhost"."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class ServerConfig:
    """Where SIP is served and under which digest realm."""

    listen: tuple[ListenAddress, ...]
    realm: str
    state_dir: Path
    """Absolute: a relative value in the file is taken relative to the file's directory."""
    digest_algorithms: tuple[str, ...] = DIGEST_ALGORITHMS
    """Offered in this order (RFC 8760: strongest first), and the only ones accepted."""
    tcp_max_connections: int = 1024
    """All TCP connections. A house has tens of handsets, one connection each; 1024 stays
    well below the descriptor limit (LimitNOFILE=8192), and is further cut to leave 256
    descriptors for state saves, the control socket and media workers."""
    tcp_max_per_address: int = 32
    """From one source (an IPv4 address, an IPv6 /64): a handset needs one connection, a
    house behind one NAT address a few dozen at most."""
    tcp_header_timeout: int = 10
    """Seconds a message (and a new connection's first one) may take to arrive whole: one
    round trip is enough, 10 s is generous for a slow link and cuts a slowloris short."""
    tcp_idle_timeout: int = 120
    """Seconds a connection without a registration binding may stay quiet (an OPTIONS
    ping, a refused REGISTER). A handset's connection stays as long as its binding."""


@dataclass(frozen=True)
class RegistrationConfig:
    """Bounds on REGISTER expiry, and how often registered devices are probed."""

    min_expires: int = 60
    max_expires: int = 3600
    default_expires: int = 600
    qualify_interval: int = 30
    """Seconds between qualify OPTIONS; 0 disables qualify."""
    qualify_timeout: int = 5


@dataclass(frozen=True)
class ControlConfig:
    """The local control socket used by the management UI."""

    socket: str = ""
    """Control socket path; "" lets the daemon choose."""
    group: str = ""
    """Group allowed to use the socket; "" means the daemon's own group."""


@dataclass(frozen=True)
class MediaConfig:
    """Media relay capacity and the UDP port range it may use."""

    max_calls: int = 8
    min_idle: int = 1
    rtp_port_low: int = 10000
    rtp_port_high: int = 10999
    calls_per_worker: int = 0
    """Calls one media worker process takes at once; 0 = as many as the pjsua2 build
    allows (at most 16); 1 = a process per call."""


@dataclass(frozen=True)
class HistoryConfig:
    """The call history (state_dir/history.sqlite3): how long rows are kept."""

    max_days: int = 365
    """Rows older than this many days are pruned; 0 keeps them whatever their age."""
    max_rows: int = 100_000
    """At most this many rows, the oldest pruned first; 0: no limit."""


@dataclass(frozen=True)
class UserConfig:
    """One extension: a number that rings one device, or several with one_number."""

    number: str
    name: str = ""
    password: str = ""
    """Empty until :func:`fill_missing_passwords` has generated one."""
    one_number: bool = False
    max_devices: int = 3
    max_outgoing_calls: int = 0
    """0 means unlimited."""
    decline: str = "this_device"
    ring_timeout: int = 30
    caller_id: str = ""
    """What an outside line is asked to show for this extension; "" leaves it to the provider."""
    forward_always: str = ""
    """Forward every call to this number (an extension, or an outside number with a trunk's prefix); "" = off."""
    forward_busy: str = ""
    """Forward when every device is busy (486/600) or the number is in do-not-disturb."""
    forward_no_answer: str = ""
    """Forward when nobody answers within `no_answer_after` seconds."""
    forward_unreachable: str = ""
    """Forward when no device is registered and reachable."""
    no_answer_after: int = 20
    """Seconds of ringing before `forward_no_answer`; replaces `ring_timeout` while it is set."""
    dnd: bool = False
    """Do not disturb: no device rings; the call forwards on busy, else gets 486."""
    dnd_devices: tuple[str, ...] = ()
    """Devices in do-not-disturb, by their stable id (`+sip.instance`, else Contact user@host)."""
    voicemail: bool = False
    """The answering machine takes calls nobody answers (after `voicemail_after` seconds of
    ringing), and calls to a number with no reachable device; forwarding wins over it."""
    voicemail_after: int = 20
    """Seconds of ringing before the answering machine answers."""
    voicemail_on_busy: bool = True
    """Every device busy: the answering machine answers at once."""
    voicemail_on_dnd: bool = True
    """Do not disturb: the answering machine answers instead of a busy signal."""
    voicemail_max_seconds: int = 120
    """The longest message a caller may leave."""

    @property
    def ring_seconds(self) -> int:
        """How long a call rings here: `no_answer_after` while forwarding on no answer is set,
        else `voicemail_after` while the answering machine is on."""
        if self.forward_no_answer:
            return self.no_answer_after
        return self.voicemail_after if self.voicemail else self.ring_timeout

    @property
    def device_limit(self) -> int:
        """How many devices may register: several only when they share one number."""
        return self.max_devices if self.one_number else 1


@dataclass(frozen=True)
class TrunkConfig:
    """A line to the family's telephone provider (a SIP account: registrar and proxy)."""

    name: str
    server: str
    """``host[:port]`` as written; ``host`` and ``port`` are its parts."""
    host: str
    """A DNS name, an IPv4 address, or an IPv6 address (without brackets)."""
    port: int | None
    """None: RFC 3263, SRV first, then A/AAAA on 5060."""
    username: str
    password: str
    auth_username: str = ""
    """The digest user name when it differs from ``username`` ("" = the same)."""
    transport: str = "udp"
    register: bool = True
    """False: the provider sends calls to a fixed address, nothing registers."""
    expires: int = 600
    max_channels: int = 2
    incoming: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """Called number (DID) -> extension; "*" = any other."""
    outgoing_prefix: str = "0"
    external_address: str = ""
    """The box's public address for SDP; "" = learned from the provider."""
    keepalive_interval: int = 25
    """Seconds between keep-alives (OPTIONS) that hold a home router's mapping open; 0 = none."""

    @property
    def auth_user(self) -> str:
        return self.auth_username or self.username


@dataclass(frozen=True)
class Config:
    """A validated config file; immutable, so it can be shared and swapped whole."""

    path: Path
    server: ServerConfig
    registration: RegistrationConfig
    control: ControlConfig
    media: MediaConfig
    feature_codes: Mapping[str, str]
    """Dialled code -> service name (one of FEATURE_SERVICES)."""
    users: tuple[UserConfig, ...]
    trunks: tuple[TrunkConfig, ...] = ()
    emergency_numbers: tuple[str, ...] = DEFAULT_EMERGENCY_NUMBERS
    history: HistoryConfig = HistoryConfig()
    _by_number: Mapping[str, UserConfig] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_number", {user.number: user for user in self.users})

    def user(self, number: str) -> UserConfig | None:
        """The user with this number, if any."""
        return self._by_number.get(number)


class LiveConfig:
    """The config in force, shared by every component and replaced whole on reload.

    Components hold this and read `current` when they decide, so a reload reaches them
    all at once without anyone being rewired.
    """

    __slots__ = ("current",)

    def __init__(self, config: Config) -> None:
        self.current = config


def control_socket_path(config: Config, environ: Mapping[str, str] | None = None) -> Path:
    """Where the control socket lives: ``[control] socket`` (relative to the config file),
    else systemd's ``$RUNTIME_DIRECTORY``, else ``$XDG_RUNTIME_DIR/homepbx``, else the state dir.

    A property of the config, so the TUI finds the socket without importing the daemon."""
    env = os.environ if environ is None else environ
    if config.control.socket:
        path = Path(config.control.socket).expanduser()
        return path if path.is_absolute() else config.path.parent / path
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return Path(runtime) / "control.sock"
    xdg = env.get("XDG_RUNTIME_DIR", "")
    if xdg:
        return Path(xdg) / "homepbx" / "control.sock"
    return config.server.state_dir / "control.sock"


# --------------------------------------------------------------------------- public API


def device_id(instance: str | None, contact: str) -> str:
    """A device's stable id, as `dnd_devices` names it: its `+sip.instance` (RFC 5626),
    else its Contact's user@host:port (kept across re-registrations and restarts; the port
    tells apart two softphones on one computer)."""
    if instance:
        return instance.strip("<>\"")
    try:
        uri = parse_name_addr(contact).uri
    except SipSyntaxError:
        return contact
    return f"{uri.user}@{uri.host_port()}" if uri.user else uri.host_port()


def load_config(path: Path) -> Config:
    """Read and validate the config file at ``path``."""
    return parse_config(_read(path), path)


def parse_config(text: str, path: Path) -> Config:
    """Validate config ``text``; ``path`` is used for error messages and relative paths."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(path, text, exc) from None
    return _Validator(path, text).config(data)


def fill_missing_passwords(path: Path) -> list[str]:
    """Give every user whose password is "" a random one, stored in the file.

    Generated at first start rather than shipped, so no two installations share
    a password. Returns the numbers of the users that got one (file order).
    """
    text = _read(path)
    config = parse_config(text, path)
    missing = [index for index, user in enumerate(config.users) if user.password == ""]
    if not missing:
        return []
    doc = _parse_for_edit(path, text)
    tables = _user_tables(doc)
    for index in missing:
        _set_key(tables[index], "password", secrets.token_urlsafe(_PASSWORD_BYTES))
    new_text = doc.as_string()
    parse_config(new_text, path)  # never write a file we could not load again
    atomic_write(path, new_text)
    return [config.users[index].number for index in missing]


def update_user(path: Path, number: str, changes: Mapping[str, object]) -> Config:
    """Change settings of user ``number`` in the file, keeping its comments and layout.

    Nothing is written unless the whole resulting file validates. Line numbers
    are not given for errors in the result, as that text never reaches the disk.
    """
    text = _read(path)
    config = parse_config(text, path)
    index = next((i for i, user in enumerate(config.users) if user.number == number), None)
    if index is None:
        line = _KeyLines(text).line_of(("users",))
        raise ConfigError(path, line, "users", f"no user with number {number!r}")
    for name in changes:
        if name not in USER_EDITABLE_FIELDS:
            raise ConfigError(
                path, None, _format_key(("users", index, name)), "not a field that can be changed"
            )

    doc = _parse_for_edit(path, text)
    table = _user_tables(doc)[index]
    for name, value in changes.items():
        try:
            _set_key(table, name, value)
        except (TypeError, ValueError):
            raise ConfigError(
                path, None, _format_key(("users", index, name)), f"cannot store {value!r} in TOML"
            ) from None
    new_text = doc.as_string()
    try:
        new_config = parse_config(new_text, path)
    except ConfigError as exc:
        raise ConfigError(path, None, exc.key, exc.message) from None
    if new_text != text:
        atomic_write(path, new_text)
    return new_config


# --------------------------------------------------------------------------- file helpers


def _read(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(path, None, "", f"cannot read file: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(path, line, "", "file is not valid UTF-8") from None


def _syntax_error(path: Path, text: str, exc: tomllib.TOMLDecodeError) -> ConfigError:
    """Turn tomllib's "msg (at line N, column M)" into a located ConfigError."""
    message = str(exc)
    match = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if match:
        line = int(match[1])
        message = f"{message[: match.start()]} (column {match[2]})"
    else:  # "(at end of document)"
        line = text.count("\n") + (0 if text.endswith("\n") else 1) or 1
        message = re.sub(r"\s*\(at end of document\)$", " at end of file", message)
    return ConfigError(path, line, "", f"invalid TOML: {message}")


def _parse_for_edit(path: Path, text: str) -> tomlkit.TOMLDocument:
    try:
        return tomlkit.parse(text)
    except tomlkit.exceptions.ParseError as exc:  # tomllib accepted it, so unlikely
        raise ConfigError(path, exc.line, "", f"cannot edit file: {exc}") from None


def _user_tables(doc: tomlkit.TOMLDocument) -> list[MutableMapping[str, Any]]:
    """The user tables of a validated document, ``[[users]]`` or inline."""
    return list(doc.get("users", []))


def _set_key(table: MutableMapping[str, Any], name: str, value: object) -> None:
    """Set ``name`` in a user's table, keeping the layout around it.

    tomlkit would append a new key after everything parsed into the table,
    including the blank lines and comments that introduce the next table. Put
    it after the table's own last line instead: its keys and the comments
    directly below them.
    """
    if name in table or not isinstance(table, tomlkit.items.Table):
        table[name] = value
        return
    body = table.value.body
    cut = len(body)
    while cut > 0 and body[cut - 1][0] is None:  # trailing whitespace and comments
        cut -= 1
    while cut < len(body) and isinstance(body[cut][1], tomlkit.items.Comment):
        cut += 1
    trailer = body[cut:]
    del body[cut:]  # keyless items only, so tomlkit's key index stays valid
    table[name] = value
    for _, item in trailer:
        table.value.append(None, item)


# --------------------------------------------------------------------------- validation

_TYPE_NAMES: tuple[tuple[type, str], ...] = (
    (bool, "a boolean"),  # before int: bool is an int subclass in Python, not in TOML
    (int, "an integer"),
    (float, "a float"),
    (str, "a string"),
    (list, "an array"),
    (dict, "a table"),
    (datetime.datetime, "a date-time"),  # before date, its base class
    (datetime.date, "a date"),
    (datetime.time, "a time"),
)


def _type_name(value: object) -> str:
    return next((name for kind, name in _TYPE_NAMES if isinstance(value, kind)), type(value).__name__)


def _format_key(key: _Key) -> str:
    """("users", 2, "max_devices") -> 'users[2].max_devices'; odd names are quoted."""
    out = ""
    for part in key:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            name = part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else json.dumps(part, ensure_ascii=False)
            out += f".{name}" if out else name
    return out


def _between(lo: int, hi: int | None) -> str:
    return f"between {lo} and {hi}" if hi is not None else f"at least {lo}"


class _Validator:
    """Turns the tomllib data of one file into a Config, or raises the first error."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.text = text
        self._lines: _KeyLines | None = None

    def error(self, key: _Key, message: str) -> ConfigError:
        if self._lines is None:  # only scanned when something is wrong
            self._lines = _KeyLines(self.text)
        return ConfigError(self.path, self._lines.line_of(key), _format_key(key), message)

    def table(self, key: _Key, value: object, allowed: Collection[str]) -> _Table:
        if not isinstance(value, dict):
            raise self.error(key, f"must be a table, not {_type_name(value)}")
        for name in value:
            if name not in allowed:
                hint = difflib.get_close_matches(name, list(allowed), n=1)
                suffix = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise self.error((*key, name), f"unknown key{suffix}")
        return _Table(self, key, value)

    def config(self, data: dict[str, Any]) -> Config:
        top = self.table((), data, ("server", "registration", "control", "media", "feature_codes", "users",
                                    "trunks", "emergency_numbers", "history"))
        server = self.server(top.section("server", ("listen", "realm", "state_dir", "digest_algorithms",
                                                    *_TCP_KEYS)))
        registration = self.registration(
            top.section(
                "registration",
                ("min_expires", "max_expires", "default_expires", "qualify_interval", "qualify_timeout"),
            )
        )
        control = self.control(top.section("control", ("socket", "group")))
        media = self.media(top.section("media", ("max_calls", "min_idle", "rtp_ports", "calls_per_worker")))
        history = self.history(top.section("history", ("max_days", "max_rows")))
        emergency = tuple(top.get_unique_list("emergency_numbers", list(DEFAULT_EMERGENCY_NUMBERS),
                                              _parse_emergency, "number"))
        users = self.users(data.get("users", []))
        for index, user in enumerate(users):
            if user.number in emergency:
                raise self.error(("users", index, "number"),
                                 f"{user.number!r} is an emergency number (emergency_numbers), not an extension")
        feature_codes = self.feature_codes(data.get("feature_codes", _DEFAULT_FEATURE_CODES), users)
        for code in feature_codes:
            if code in emergency:
                raise self.error(("feature_codes", code), "feature code is also an emergency number")
        trunks = self.trunks(data.get("trunks", []), users, feature_codes)
        self.check_forwarding(users, trunks, emergency)
        return Config(
            path=self.path,
            server=server,
            registration=registration,
            control=control,
            media=media,
            feature_codes=MappingProxyType(feature_codes),
            users=users,
            trunks=trunks,
            emergency_numbers=emergency,
            history=history,
        )

    def server(self, t: _Table) -> ServerConfig:
        listen = t.get_unique_list("listen", ["0.0.0.0:5060"], _parse_listen, "address")

        def algorithm(text: str) -> str:
            name = text.upper()
            if name not in DIGEST_ALGORITHMS:
                raise ValueError(f"unsupported: choose from {', '.join(DIGEST_ALGORITHMS)}")
            return name

        algorithms = t.get_unique_list("digest_algorithms", list(DIGEST_ALGORITHMS), algorithm, "algorithm")

        realm = t.get_str("realm", "home.arpa")
        if not realm or any(c.isspace() or c in "\"'\\" or not c.isprintable() for c in realm):
            raise t.error("realm", "must be non-empty, without whitespace, quotes or backslashes")

        state_dir = t.get_str("state_dir", "state")
        if not state_dir or "\0" in state_dir:
            raise t.error("state_dir", "must be a non-empty path")
        resolved = Path(os.path.normpath(self.path.absolute().parent / state_dir))
        d = ServerConfig(listen=(), realm="", state_dir=resolved)
        tcp_max = t.get_int("tcp_max_connections", d.tcp_max_connections, 1, 65536)
        per_address = t.get_int("tcp_max_per_address", d.tcp_max_per_address, 1, 65536)
        t.ordered("tcp_max_per_address", per_address, "tcp_max_connections", tcp_max, blame="tcp_max_per_address")
        return ServerConfig(
            listen=tuple(listen), realm=realm, state_dir=resolved, digest_algorithms=tuple(algorithms),
            tcp_max_connections=tcp_max, tcp_max_per_address=per_address,
            tcp_header_timeout=t.get_int("tcp_header_timeout", d.tcp_header_timeout, 1, 300),
            tcp_idle_timeout=t.get_int("tcp_idle_timeout", d.tcp_idle_timeout, 1, 86400),
        )

    def registration(self, t: _Table) -> RegistrationConfig:
        d = RegistrationConfig()
        reg = RegistrationConfig(
            min_expires=t.get_int("min_expires", d.min_expires, 1),
            max_expires=t.get_int("max_expires", d.max_expires, 1),
            default_expires=t.get_int("default_expires", d.default_expires, 1),
            qualify_interval=t.get_int("qualify_interval", d.qualify_interval, 0),
            qualify_timeout=t.get_int("qualify_timeout", d.qualify_timeout, 1),
        )
        blame = "default_expires"  # the value that must fit between the other two
        t.ordered("min_expires", reg.min_expires, "default_expires", reg.default_expires, blame=blame)
        t.ordered("default_expires", reg.default_expires, "max_expires", reg.max_expires, blame=blame)
        return reg

    def control(self, t: _Table) -> ControlConfig:
        d = ControlConfig()
        return ControlConfig(socket=t.get_str("socket", d.socket), group=t.get_str("group", d.group))

    def media(self, t: _Table) -> MediaConfig:
        d = MediaConfig()
        # 0: no media workers; calls are routed in the edge only and media flows between
        # the handsets (no join, no transcoding), for the smallest boxes.
        max_calls = t.get_int("max_calls", d.max_calls, 0, 64)
        min_idle = t.get_int("min_idle", d.min_idle if max_calls else 0, 0)
        t.ordered("min_idle", min_idle, "max_calls", max_calls, blame="min_idle")
        ports = t.get_str("rtp_ports", f"{d.rtp_port_low}-{d.rtp_port_high}")
        match = re.fullmatch(r"([0-9]{1,5})-([0-9]{1,5})", ports)
        low, high = (int(match[1]), int(match[2])) if match else (0, 0)
        if not 1024 <= low < high <= 65535:
            raise t.error("rtp_ports", f'{ports!r}: must be "LOW-HIGH" with 1024 <= LOW < HIGH <= 65535')
        calls_per_worker = t.get_int("calls_per_worker", d.calls_per_worker, 0, 16)
        return MediaConfig(max_calls=max_calls, min_idle=min_idle, rtp_port_low=low, rtp_port_high=high,
                           calls_per_worker=calls_per_worker)

    def history(self, t: _Table) -> HistoryConfig:
        d = HistoryConfig()
        return HistoryConfig(max_days=t.get_int("max_days", d.max_days, 0, 36500),
                             max_rows=t.get_int("max_rows", d.max_rows, 0, 10_000_000))

    def feature_codes(self, value: object, users: tuple[UserConfig, ...]) -> dict[str, str]:
        if not isinstance(value, dict):
            raise self.error(("feature_codes",), f"must be a table, not {_type_name(value)}")
        t = _Table(self, ("feature_codes",), value)  # codes are free-form keys
        numbers = {user.number for user in users}
        codes: dict[str, str] = {}
        for code, service in value.items():
            if not re.fullmatch(r"[0-9*#]{1,16}", code):
                raise t.error(code, "a feature code must be 1-16 of the characters 0-9 * #")
            if code in numbers:
                raise t.error(code, "feature code is also the number of a user")
            if not isinstance(service, str):
                raise t.error(code, f"must be a string, not {_type_name(service)}")
            if service not in FEATURE_SERVICES:
                raise t.error(code, f"unknown service {service!r} (known: {', '.join(FEATURE_SERVICES)})")
            codes[code] = service
        for code, service in codes.items():
            if service in PREFIX_SERVICES:
                other = next((c for c in sorted(codes) if c != code and c.startswith(code)), None)
                if other is not None:
                    raise t.error(other, f"starts with {code!r}, the code of {service!r} that a number follows "
                                         "(it could not be dialled)")
        return codes

    def users(self, value: object) -> tuple[UserConfig, ...]:
        if not isinstance(value, list):
            raise self.error(("users",), f"must be an array of tables ([[users]]), not {_type_name(value)}")
        users: list[UserConfig] = []
        seen: dict[str, int] = {}
        for index, item in enumerate(value):
            user = self.user(self.table(("users", index), item, USER_EDITABLE_FIELDS | {"number", "caller_id"}))
            if user.number in seen:
                raise self.error(
                    ("users", index, "number"),
                    f"duplicate number {user.number!r} (also users[{seen[user.number]}])",
                )
            seen[user.number] = index
            users.append(user)
        return tuple(users)

    def user(self, t: _Table) -> UserConfig:
        if "number" not in t.data:
            raise t.error("number", "missing required key")
        number = t.data["number"]
        if isinstance(number, int) and not isinstance(number, bool):
            raise t.error("number", f'must be a string (number = "{number}"), not an integer')
        number = t.get_str("number", "")
        if not re.fullmatch(r"[0-9]{1,15}", number):
            raise t.error("number", f"{number!r}: must be 1-15 digits")
        d = UserConfig(number=number)
        name = t.get_str("name", d.name)
        if not name.isprintable():
            raise t.error("name", "must not contain control characters")
        decline = t.get_str("decline", d.decline)
        if decline not in DECLINE_MODES:
            raise t.error("decline", f"{decline!r}: must be one of {', '.join(DECLINE_MODES)}")
        return UserConfig(
            number=number,
            name=name,
            password=t.get_str("password", d.password),
            one_number=t.get_bool("one_number", d.one_number),
            max_devices=t.get_int("max_devices", d.max_devices, 1, 10),
            max_outgoing_calls=t.get_int("max_outgoing_calls", d.max_outgoing_calls, 0),
            decline=decline,
            ring_timeout=t.get_int("ring_timeout", d.ring_timeout, 5, 600),
            caller_id=self.caller_id(t),
            **{name: self.forward_target(t, name, number) for name in FORWARD_FIELDS},
            no_answer_after=t.get_int("no_answer_after", d.no_answer_after, 5, 600),
            dnd=t.get_bool("dnd", d.dnd),
            dnd_devices=self.dnd_devices(t),
            voicemail=t.get_bool("voicemail", d.voicemail),
            voicemail_after=t.get_int("voicemail_after", d.voicemail_after, 5, 600),
            voicemail_on_busy=t.get_bool("voicemail_on_busy", d.voicemail_on_busy),
            voicemail_on_dnd=t.get_bool("voicemail_on_dnd", d.voicemail_on_dnd),
            voicemail_max_seconds=t.get_int("voicemail_max_seconds", d.voicemail_max_seconds, 5, 3600),
        )

    @staticmethod
    def forward_target(t: _Table, name: str, number: str) -> str:
        target = t.get_str(name, "")
        if target and not re.fullmatch(r"\+?[0-9*#]{1,32}", target):
            raise t.error(name, f"{target!r}: must be a number (an extension, or an outside number with a "
                                "trunk's outgoing_prefix), or \"\" for off")
        if target == number:
            raise t.error(name, f"{target!r}: a number cannot forward to itself")
        return target

    @staticmethod
    def dnd_devices(t: _Table) -> tuple[str, ...]:
        raw = t.data.get("dnd_devices", [])
        if not isinstance(raw, list) or not all(isinstance(v, str) and v and v.isprintable() for v in raw):
            raise t.error("dnd_devices", "must be an array of device ids (strings)")
        return tuple(dict.fromkeys(raw))

    def check_forwarding(self, users: tuple[UserConfig, ...], trunks: tuple[TrunkConfig, ...],
                         emergency: tuple[str, ...]) -> None:
        """Each forwarding target is an extension, or an outside number a trunk's prefix routes."""
        numbers = {user.number for user in users}
        prefixes = [t.outgoing_prefix for t in trunks]
        for index, user in enumerate(users):
            for name in FORWARD_FIELDS:
                target = getattr(user, name)
                if not target or target in numbers:
                    continue
                if target in emergency:
                    raise self.error(("users", index, name), f"{target!r}: calls are not forwarded to an "
                                                              "emergency number")
                routed = any(p == "" or (target.startswith(p) and len(target) > len(p)) for p in prefixes)
                if not routed:
                    raise self.error(("users", index, name),
                                     f"{target!r}: no such extension, and no trunk's outgoing_prefix routes it")

    @staticmethod
    def caller_id(t: _Table) -> str:
        caller_id = t.get_str("caller_id", "")
        if caller_id and not re.fullmatch(r"\+?[0-9]{1,20}", caller_id):
            raise t.error("caller_id", f"{caller_id!r}: must be a phone number (digits, an optional leading +)")
        return caller_id

    def trunks(self, value: object, users: tuple[UserConfig, ...], codes: Mapping[str, str]) -> tuple[TrunkConfig, ...]:
        if not isinstance(value, list):
            raise self.error(("trunks",), f"must be an array of tables ([[trunks]]), not {_type_name(value)}")
        numbers = {user.number for user in users}
        trunks: list[TrunkConfig] = []
        names: dict[str, int] = {}
        prefixes: dict[str, int] = {}
        for index, item in enumerate(value):
            t = self.table(("trunks", index), item, _TRUNK_KEYS)
            trunk = self.trunk(t, numbers)
            if trunk.name in names:
                raise t.error("name", f"duplicate trunk name {trunk.name!r} (also trunks[{names[trunk.name]}])")
            names[trunk.name] = index
            prefix = trunk.outgoing_prefix
            if prefix in prefixes:
                raise t.error("outgoing_prefix", f"{prefix!r} is also the prefix of trunks[{prefixes[prefix]}]")
            prefixes[prefix] = index
            clash = next((n for n in sorted(numbers | set(codes)) if prefix and n.startswith(prefix)), None)
            if clash is not None:
                raise t.error("outgoing_prefix",
                              f"{prefix!r}: extension or feature code {clash!r} starts with it "
                              "(it could not be dialled)")
            trunks.append(trunk)
        return tuple(trunks)

    def trunk(self, t: _Table, numbers: set[str]) -> TrunkConfig:
        for required in ("name", "server", "username", "password"):
            if required not in t.data:
                raise t.error(required, "missing required key")
        name = t.get_str("name", "")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", name):
            raise t.error("name", f"{name!r}: must be 1-32 of the characters A-Z a-z 0-9 _ . -")
        server = t.get_str("server", "")
        try:
            host, port = _parse_server(server)
        except ValueError as exc:
            raise t.error("server", f"{server!r}: {exc}") from None
        username = t.get_str("username", "")
        auth_username = t.get_str("auth_username", "")
        for key, text in (("username", username), ("auth_username", auth_username or "x")):
            if not re.fullmatch(r"[A-Za-z0-9_.!~*'()&=+$,;?/%+-]{1,64}", text):
                raise t.error(key, f"{text!r}: must be 1-64 characters, no spaces, quotes, @ or :")
        password = t.get_str("password", "")
        if not password or not password.isprintable():
            raise t.error("password", "must be non-empty, without control characters")
        transport = t.get_str("transport", "udp").lower()
        if transport not in TRUNK_TRANSPORTS:
            raise t.error("transport", f"{transport!r}: must be one of {', '.join(TRUNK_TRANSPORTS)}")
        d = TrunkConfig(name="", server="", host="", port=None, username="", password="")
        prefix = t.get_str("outgoing_prefix", d.outgoing_prefix)
        if not re.fullmatch(r"[0-9*#]{0,4}", prefix):
            raise t.error("outgoing_prefix", f"{prefix!r}: must be up to 4 of the characters 0-9 * # (or \"\")")
        external = t.get_str("external_address", "")
        if external:
            try:
                external = str(ipaddress.ip_address(external))
            except ValueError:
                raise t.error("external_address", f"{external!r}: must be an IP address") from None
        keepalive = t.get_int("keepalive_interval", d.keepalive_interval, 0, 3600)
        return TrunkConfig(
            name=name, server=server, host=host, port=port, username=username, password=password,
            auth_username=auth_username, transport=transport,
            register=t.get_bool("register", d.register),
            expires=t.get_int("expires", d.expires, 60, 86400),
            max_channels=t.get_int("max_channels", d.max_channels, 1, 100),
            incoming=MappingProxyType(self.incoming(t, numbers)),
            outgoing_prefix=prefix, external_address=external, keepalive_interval=keepalive,
        )

    def incoming(self, t: _Table, numbers: set[str]) -> dict[str, str]:
        raw = t.data.get("incoming", {})
        if not isinstance(raw, dict):
            raise t.error("incoming", f"must be a table (DID = extension), not {_type_name(raw)}")
        routes: dict[str, str] = {}
        for did, target in raw.items():
            key = (*t.key, "incoming", did)
            if did != "*" and not re.fullmatch(r"\+?[0-9]{1,20}", did):
                raise self.error(key, 'a called number must be digits (an optional leading +), or "*" for any other')
            if not isinstance(target, str):
                raise self.error(key, f"must be a string (an extension), not {_type_name(target)}")
            if target not in numbers:
                raise self.error(key, f"{target!r} is not the number of a user")
            routes[did] = target
        return routes


class _Table:
    """One table of the file whose keys are known: typed reads with located errors."""

    def __init__(self, validator: _Validator, key: _Key, data: dict[str, Any]) -> None:
        self.validator = validator
        self.key = key
        self.data = data

    def error(self, name: str, message: str) -> ConfigError:
        return self.validator.error((*self.key, name), message)

    def section(self, name: str, allowed: Collection[str]) -> _Table:
        return self.validator.table((*self.key, name), self.data.get(name, {}), allowed)

    def _typed(self, name: str, default: Any, kind: type, kind_name: str) -> Any:
        value = self.data.get(name, default)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(name, f"must be {kind_name}, not {_type_name(value)}")
        return value

    def get_str(self, name: str, default: str) -> str:
        value: str = self._typed(name, default, str, "a string")
        return value

    def get_bool(self, name: str, default: bool) -> bool:
        value: bool = self._typed(name, default, bool, "a boolean (true or false)")
        return value

    def get_int(self, name: str, default: int, lo: int, hi: int | None = None) -> int:
        value: int = self._typed(name, default, int, "an integer")
        if value < lo or (hi is not None and value > hi):
            raise self.error(name, f"must be {_between(lo, hi)}, not {value}")
        return value

    def get_unique_list(self, name: str, default: list[str], parse: Callable[[str], T], what: str) -> list[T]:
        """A non-empty array of strings, each parsed (ValueError names the fault), no repeats."""
        raw = self.data.get(name, default)
        if not isinstance(raw, list):
            raise self.error(name, f"must be an array of strings, not {_type_name(raw)}")
        if not raw:
            raise self.error(name, f"must name at least one {what}")
        items: list[T] = []
        for index, text in enumerate(raw):
            key = (*self.key, name, index)
            if not isinstance(text, str):
                raise self.validator.error(key, f"must be a string, not {_type_name(text)}")
            try:
                item = parse(text)
            except ValueError as exc:
                raise self.validator.error(key, f"{text!r}: {exc}") from None
            if item in items:
                other = _format_key((*self.key, name, items.index(item)))
                raise self.validator.error(key, f"duplicate {what} {str(item)!r} (also {other})")
            items.append(item)
        return items

    def ordered(self, low_name: str, low: int, high_name: str, high: int, *, blame: str) -> None:
        """Require low <= high, blaming ``blame`` unless the file leaves it at its default."""
        if low <= high:
            return
        if blame not in self.data:
            blame = high_name if blame == low_name else low_name
        raise self.error(blame, f"{low_name} ({low}) must not be greater than {high_name} ({high})")


def _parse_emergency(text: str) -> str:
    if not re.fullmatch(r"[0-9]{2,6}", text):
        raise ValueError("an emergency number must be 2-6 digits")
    return text


_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?")


def _parse_server(text: str) -> tuple[str, int | None]:
    """``host[:port]`` (IPv6 in brackets): a host name or IP address, and the port if given."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError('missing "]" after the IPv6 address')
        host, rest = text[1:end], text[end + 1 :]
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
        if rest and not rest.startswith(":"):
            raise ValueError('expected "[IPv6]" or "[IPv6]:PORT"')
        port_text = rest[1:] if rest else None
    else:
        host, colon, port_text_ = text.rpartition(":")
        if not colon:
            host, port_text_ = text, ""
        if ":" in host:
            raise ValueError('an IPv6 address must be in brackets, e.g. "[2001:db8::1]:5060"')
        if not _HOSTNAME_RE.fullmatch(host):
            raise ValueError("expected a host name or IP address, with an optional :PORT")
        port_text = port_text_ if colon else None
    if port_text is None:
        return host, None
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError("the port must be a number from 1 to 65535")
    return host, int(port_text)


def _parse_listen(text: str) -> ListenAddress:
    """Parse "HOST:PORT" / "[IPv6]:PORT"; ValueError says what is wrong."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError('missing "]" after the IPv6 address')
        host, rest = text[1:end], text[end + 1 :]
        if not rest.startswith(":"):
            raise ValueError('missing port (write "[IPv6]:PORT")')
        port_text = rest[1:]
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ValueError('missing port (write "HOST:PORT")')
        if ":" in host:
            raise ValueError('an IPv6 address must be in brackets, e.g. "[::1]:5060"')
        if host != "localhost":
            try:
                host = str(ipaddress.IPv4Address(host))
            except ValueError:
                raise ValueError('the host must be an IP address or "localhost"') from None
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError("the port must be a number from 1 to 65535")
    return ListenAddress(host, int(port_text))


# --------------------------------------------------------------------------- key -> line

_BARE_KEY_CHARS = frozenset(string.ascii_letters + string.digits + "_-")


class _KeyLines:
    """The line on which each key path of a TOML text is defined.

    Neither tomllib nor tomlkit reports positions, so this re-scans the text.
    It only ever sees text tomllib has accepted, so it can be lenient; it must
    merely never loop or crash on anything.
    """

    def __init__(self, text: str) -> None:
        self.lines: dict[_Key, int] = {}
        self._text = text
        self._pos = 0
        self._newlines = [i for i, c in enumerate(text) if c == "\n"]
        self._tables_in: dict[_Key, int] = {}  # array-of-tables path -> [[...]] headers so far
        self._scan()

    def line_of(self, key: _Key) -> int | None:
        """Line of ``key``, else of the nearest enclosing key or table in the text."""
        for length in range(len(key), 0, -1):
            line = self.lines.get(key[:length])
            if line is not None:
                return line
        return None

    # -- scanning

    def _scan(self) -> None:
        table: _Key = ()
        while True:
            self._skip_blank()
            if self._pos >= len(self._text):
                return
            line = self._line()
            if self._text.startswith("[[", self._pos):
                self._pos += 2
                parts = self._key()
                array = self._resolve(parts[:-1]) + parts[-1:]
                index = self._tables_in.get(array, 0)
                self._tables_in[array] = index + 1
                table = (*array, index)
                self._define(table, line)
            elif self._peek() == "[":
                self._pos += 1
                table = self._resolve(self._key())
                self._define(table, line)
            else:
                key = table + self._key()
                self._define(key, line)
                self._after_equals()
                self._value(key)
            self._skip_line()

    def _resolve(self, parts: _Key) -> _Key:
        """Header names refer to the latest table of an array of tables."""
        path: _Key = ()
        for part in parts:
            path = (*path, part)
            count = self._tables_in.get(path)
            if count:
                path = (*path, count - 1)
        return path

    def _define(self, key: _Key, line: int) -> None:
        for length in range(1, len(key)):
            self.lines.setdefault(key[:length], line)  # implicitly created parents
        self.lines[key] = line

    def _value(self, key: _Key) -> None:
        char = self._peek()
        if char in ('"', "'"):
            self._string()
        elif char == "[":
            self._array(key)
        elif char == "{":
            self._inline_table(key)
        else:
            while self._pos < len(self._text) and self._text[self._pos] not in ",]}#\n":
                self._pos += 1

    def _array(self, key: _Key) -> None:
        self._pos += 1
        index = 0
        while True:
            self._skip_blank()
            if self._pos >= len(self._text) or self._peek() == "]":
                self._pos += 1
                return
            element = (*key, index)
            self.lines[element] = self._line()
            start = self._pos
            self._value(element)
            if self._pos == start:
                self._pos += 1
            self._skip_blank()
            if self._peek() == ",":
                self._pos += 1
            index += 1

    def _inline_table(self, key: _Key) -> None:
        self._pos += 1
        while True:
            self._skip_blank()
            if self._pos >= len(self._text) or self._peek() == "}":
                self._pos += 1
                return
            start = self._pos
            sub = key + self._key()
            self._define(sub, self._line())
            self._after_equals()
            self._value(sub)
            if self._pos == start:
                self._pos += 1
            self._skip_blank()
            if self._peek() == ",":
                self._pos += 1

    def _key(self) -> _Key:
        parts: list[str] = []
        while True:
            self._skip_space()
            start = self._pos
            if self._peek() in ('"', "'"):
                self._string()
                parts.append(_decode_quoted_key(self._text[start : self._pos]))
            else:
                while self._peek() in _BARE_KEY_CHARS:
                    self._pos += 1
                if self._pos == start:
                    break
                parts.append(self._text[start : self._pos])
            self._skip_space()
            if self._peek() != ".":
                break
            self._pos += 1
        return tuple(parts)

    def _string(self) -> None:
        """Skip a string of any of TOML's four kinds."""
        text = self._text
        quote = text[self._pos]
        delim = quote * 3 if text.startswith(quote * 3, self._pos) else quote
        pos = self._pos + len(delim)
        while pos < len(text):
            if quote == '"' and text[pos] == "\\":
                pos += 2
            elif text.startswith(delim, pos):
                pos += len(delim)
                extra = 0  # a multi-line string may end with up to two quotes of its own
                while len(delim) == 3 and extra < 2 and text.startswith(quote, pos):
                    pos += 1
                    extra += 1
                break
            elif len(delim) == 1 and text[pos] == "\n":
                break
            else:
                pos += 1
        self._pos = min(pos, len(text))

    def _after_equals(self) -> None:
        self._skip_space()
        if self._peek() == "=":
            self._pos += 1
        self._skip_space()

    def _peek(self) -> str:
        return self._text[self._pos : self._pos + 1]

    def _line(self) -> int:
        return bisect.bisect_left(self._newlines, self._pos) + 1

    def _skip_space(self) -> None:
        while self._peek() in (" ", "\t"):
            self._pos += 1

    def _skip_line(self) -> None:
        end = self._text.find("\n", self._pos)
        self._pos = len(self._text) if end < 0 else end + 1

    def _skip_blank(self) -> None:
        """Skip whitespace, newlines and comments."""
        while self._pos < len(self._text):
            char = self._text[self._pos]
            if char in " \t\r\n":
                self._pos += 1
            elif char == "#":
                self._skip_line()
            else:
                return


def _decode_quoted_key(raw: str) -> str:
    if raw.startswith("'"):
        return raw[1:-1]
    try:  # let tomllib apply the escapes of a basic string
        value = tomllib.loads(f"k = {raw}")["k"]
    except tomllib.TOMLDecodeError:
        return raw[1:-1]
    return value if isinstance(value, str) else raw[1:-1]
