"""The box's addresses for the TUI: which interface addresses a wildcard listen becomes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance import netaddr
from appliance.config import ListenAddress, LiveConfig, parse_config
from appliance.netaddr import AddressCache, InterfaceAddress, parse_ip_json, select
from appliance.sip.registrar import Registrar
from appliance.state import LiveState

LO = [InterfaceAddress("lo", "127.0.0.1"), InterfaceAddress("lo", "::1")]
HOUSE = [*LO,
         InterfaceAddress("eth0", "fe80::fc:ff:fe00:1"),
         InterfaceAddress("eth0", "fd00::2"),
         InterfaceAddress("eth0", "192.168.1.2"),
         InterfaceAddress("wlan0", "10.0.0.5"),
         InterfaceAddress("wlan0", "2001:db8::7")]


def listen(*texts: str) -> list[ListenAddress]:
    out = []
    for text in texts:
        host, _, port = text.rpartition(":")
        out.append(ListenAddress(host.strip("[]"), int(port)))
    return out


def test_ipv4_wildcard_becomes_the_interfaces_ipv4_addresses_without_loopback() -> None:
    assert select(listen("0.0.0.0:5060"), HOUSE) == ["192.168.1.2:5060", "10.0.0.5:5060"]


def test_ipv6_wildcard_brackets_and_leaves_out_link_local_and_loopback() -> None:
    assert select(listen("[::]:5070"), HOUSE) == ["[fd00::2]:5070", "[2001:db8::7]:5070"]


def test_both_wildcards_list_ipv4_first() -> None:
    assert select(listen("[::]:5060", "0.0.0.0:5060"), HOUSE) == [
        "192.168.1.2:5060", "10.0.0.5:5060", "[fd00::2]:5060", "[2001:db8::7]:5060"]


def test_loopback_only_when_it_is_all_there_is() -> None:
    assert select(listen("0.0.0.0:5060", "[::]:5060"), LO) == ["127.0.0.1:5060", "[::1]:5060"]
    only_link_local = [*LO, InterfaceAddress("eth0", "fe80::1%eth0")]
    assert select(listen("[::]:5060"), only_link_local) == ["[::1]:5060"]


def test_explicit_hosts_are_kept_and_need_no_interfaces() -> None:
    assert select(listen("192.168.1.2:5060", "[::1]:5062", "localhost:5064"), []) == [
        "192.168.1.2:5060", "localhost:5064", "[::1]:5062"]
    assert select(listen("192.168.1.2:5060", "0.0.0.0:5060"), HOUSE) == ["192.168.1.2:5060", "10.0.0.5:5060"]


def test_a_wildcard_with_no_address_at_all_stays_as_configured() -> None:
    assert select(listen("0.0.0.0:5060"), [InterfaceAddress("eth0", "fd00::2")]) == ["0.0.0.0:5060"]


IP_JSON = [
    {"ifname": "lo", "flags": ["LOOPBACK", "UP", "LOWER_UP"], "addr_info": [
        {"family": "inet", "local": "127.0.0.1", "prefixlen": 8, "scope": "host"}]},
    {"ifname": "eth1", "flags": ["BROADCAST", "MULTICAST"], "addr_info": [  # down: unreachable
        {"family": "inet", "local": "172.16.0.9", "prefixlen": 24, "scope": "global"}]},
    {"ifname": "eth0", "flags": ["BROADCAST", "MULTICAST", "UP", "LOWER_UP"], "addr_info": [
        {"family": "inet", "local": "192.168.1.2", "prefixlen": 24, "scope": "global"},
        {"family": "inet6", "local": "fd00::9", "prefixlen": 64, "dadfailed": True, "tentative": True},
        {"family": "inet6", "local": "fd00::2", "prefixlen": 64, "scope": "global"}]},
    {"ifname": "ifb0", "flags": ["BROADCAST", "NOARP"], "addr_info": []},
]


def test_ip_json_gives_the_addresses_of_interfaces_that_are_up() -> None:
    assert parse_ip_json(json.dumps(IP_JSON)) == [
        InterfaceAddress("lo", "127.0.0.1"), InterfaceAddress("eth0", "192.168.1.2"),
        InterfaceAddress("eth0", "fd00::2")]
    with pytest.raises(ValueError):
        parse_ip_json("Object \"addr\" is unknown")
    with pytest.raises(ValueError):
        parse_ip_json('{"ifname": "lo"}')


def test_this_machine_is_listed_with_ip_and_without() -> None:
    with_ip = netaddr.interface_addresses()
    assert InterfaceAddress("lo", "127.0.0.1") in with_ip
    old = netaddr.IP_COMMAND
    netaddr.IP_COMMAND = ("/nonexistent/ip", "-j", "addr")
    try:  # the fallback asks the kernel for the default route's source (or finds none)
        fallback = netaddr.interface_addresses()
    finally:
        netaddr.IP_COMMAND = old
    non_loopback = {a.address for a in with_ip} - {"127.0.0.1", "::1"}
    assert all(a.interface == "default" and a.address in non_loopback for a in fallback)


def test_the_cache_looks_up_once_per_interval_and_only_for_wildcards() -> None:
    calls: list[int] = []

    def lookup() -> list[InterfaceAddress]:
        calls.append(1)
        return HOUSE

    cache = AddressCache(lookup, ttl=5.0)
    assert cache.addresses(listen("192.168.1.2:5060"), 100.0) == ["192.168.1.2:5060"]
    assert calls == []
    assert cache.addresses(listen("0.0.0.0:5060"), 100.0) == ["192.168.1.2:5060", "10.0.0.5:5060"]
    cache.addresses(listen("0.0.0.0:5060"), 104.9)
    assert len(calls) == 1
    cache.addresses(listen("0.0.0.0:5060"), 105.0)
    assert len(calls) == 2
    cache.addresses(listen("0.0.0.0:5060"), 50.0)  # the clock went back: looked up again
    assert len(calls) == 3


def test_the_snapshot_carries_this_machines_addresses_for_a_wildcard(tmp_path: Path) -> None:
    config = parse_config('[server]\nlisten = ["0.0.0.0:5062"]\n[[users]]\nnumber = "200"\npassword = "x"\n',
                          tmp_path / "config.toml")
    snap = LiveState(Registrar(60, 3600, 600), LiveConfig(config)).snapshot()
    assert snap["listen"] == ["0.0.0.0:5062"]
    assert snap["addresses"] == select(config.server.listen, netaddr.interface_addresses())
    assert snap["addresses"] and "0.0.0.0:5062" not in snap["addresses"]  # this machine has an IPv4 address
