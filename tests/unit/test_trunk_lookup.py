"""Looking the provider up (RFC 3263) in edge/trunks.py: what needs no DNS, what a failed
lookup becomes, and that the edge loads dnspython only when a lookup needs it."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import dns.asyncresolver
import dns.exception
import pytest

from appliance.config import TrunkConfig
from appliance.edge.trunks import LookupFailed, resolve_rfc3263
from appliance.source import REPO_ROOT


def trunk(host: str, port: int | None = None) -> TrunkConfig:
    server = host if port is None else f"{host}:{port}"
    return TrunkConfig(name="provider", server=server, host=host, port=port, username="u", password="p")


def test_an_address_needs_no_lookup() -> None:
    assert asyncio.run(resolve_rfc3263(trunk("192.0.2.10"))) == [("192.0.2.10", 5060)]
    assert asyncio.run(resolve_rfc3263(trunk("2001:db8::1", 5080))) == [("2001:db8::1", 5080)]


def test_a_failed_srv_lookup_is_an_oserror_with_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registrar takes a Resolver's OSError as "resolve failed", retried on its backoff."""
    async def timeout(*_: object, **__: object) -> None:
        raise dns.exception.Timeout(timeout=10.0)

    monkeypatch.setattr(dns.asyncresolver, "resolve", timeout)
    with pytest.raises(LookupFailed, match="10") as caught:
        asyncio.run(resolve_rfc3263(trunk("sip.provider.example")))
    assert isinstance(caught.value, OSError)


def test_the_edge_loads_neither_dnspython_nor_the_mail_and_web_modules() -> None:
    """5.5 MB and 3 MB of the edge's memory: dnspython only for a provider named by its
    domain without a port (loaded at its lookup), email/http/urllib.request never."""
    code = ("import sys, appliance.daemon; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'dns', 'email', 'http', 'xml'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
