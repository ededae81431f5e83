"""Our pjsua2 build (image/pjsua2/): the loaded bindings are our wheel, with our limits and
only the codecs homepbx uses, against Debian's OpenSSL 3; the version pinned in
pyproject.toml is the one build.sh makes; the cache key follows the build's inputs.

The endpoint runs in a child process (this module with ``--child``): pjsua2 keeps one
library per process.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PJSUA2 = REPO / "image" / "pjsua2"
DIST = "homepbx-pjsua2"


def build_script_version() -> str:
    text = (PJSUA2 / "build.sh").read_text()
    fields = dict(re.findall(r"^(PJ_VERSION|PJ_COMMIT|BUILD_NUMBER)=(\S+)$", text, re.M))
    return f"{fields['PJ_VERSION']}+g{fields['PJ_COMMIT']}.{fields['BUILD_NUMBER']}"


def test_pyproject_pins_the_version_build_sh_makes() -> None:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d for d in deps if d.startswith(DIST)]
    assert pins == [f"{DIST}=={build_script_version()}"]
    assert not [d for d in deps if d.startswith("pjsua2-python")], "the PyPI wheel is no dependency any more"


def test_the_loaded_pjsua2_is_our_wheel() -> None:
    assert importlib.metadata.packages_distributions().get("pjsua2") == [DIST]
    assert importlib.metadata.version(DIST) == build_script_version()


def child() -> None:
    """Start the library with our limits and report what it has (JSON on stdout)."""
    import pjsua2 as pj

    ep = pj.Endpoint()
    ep.libCreate()
    cfg = pj.EpConfig()
    cfg.uaConfig.maxCalls = 64
    cfg.uaConfig.threadCnt = 0
    cfg.uaConfig.mainThreadOnly = True
    cfg.logConfig.level = 0
    cfg.logConfig.consoleLevel = 0
    ep.libInit(cfg)
    ep.audDevManager().setNullDev()
    lib = ctypes.CDLL(pj._pjsua2.__file__, mode=os.RTLD_NOLOAD | os.RTLD_NOW)
    lib.pjsua_call_get_max_count.restype = ctypes.c_uint
    lib.pjsua_conf_get_max_ports.restype = ctypes.c_uint
    tls = pj.TransportConfig()
    tls.port = 0
    tls.boundAddress = "127.0.0.1"
    tls_id = ep.transportCreate(pj.PJSIP_TRANSPORT_TLS, tls)
    maps = Path("/proc/self/maps").read_text()
    report = {
        "version": ep.libVersion().full,
        "max_calls": lib.pjsua_call_get_max_count(),
        "conf_ports": lib.pjsua_conf_get_max_ports(),
        "codecs": sorted(c.codecId for c in ep.codecEnum2()),
        "g722_pcm_shift": lib.pjmedia_codec_g722_set_pcm_shift(1),
        "tls_transport": tls_id >= 0,
        "srtp": hasattr(lib, "pjmedia_transport_srtp_create"),
        "libssl3": "/libssl.so.3" in maps,
        "sound_devices": [d.driver for d in ep.audDevManager().enumDev2()],
        "text_streams": pj.CallSetting(True).textCount,
    }
    ep.libDestroy()
    print(json.dumps(report))


def test_our_limits_codecs_and_openssl_3() -> None:
    out = subprocess.run(
        [sys.executable, __file__, "--child"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert report["version"].startswith("2.17")
    assert report["max_calls"] == 64  # the PyPI wheel clamps it to 4
    assert report["conf_ports"] >= 64 + 128 + 64  # calls, players, recorders
    assert report["codecs"] == ["G722/16000/1", "PCMA/8000/1", "PCMU/8000/1"]
    assert report["g722_pcm_shift"] == 0  # appliance/pjhost.py calls it through ctypes
    assert report["tls_transport"] and report["srtp"] and report["libssl3"]
    assert set(report["sound_devices"]) <= {"null", ""}  # no ALSA, no PortAudio
    assert report["text_streams"] == 0  # no m=text (T.140) in offers: voice only


def test_cache_key_follows_every_input(tmp_path: Path) -> None:
    def key(root: Path, **env: str) -> str:
        return subprocess.run(
            [str(root / "build.sh"), "--key"], capture_output=True, text=True, check=True,
            env={**os.environ, "ARCH": "amd64", **env},
        ).stdout.strip()

    copy = tmp_path / "pjsua2"
    shutil.copytree(PJSUA2, copy)
    base = key(copy)
    assert re.fullmatch(r"[0-9a-f]{16}", base) and key(PJSUA2) == base
    assert key(copy, ARCH="arm64") != base
    for name in ("config_site.h", "build.sh", "mkwheel.py", "patches/resample-linear.patch"):
        path = copy / name
        original = path.read_text()
        path.write_text(original + "\n")
        assert key(copy) != base, name
        path.write_text(original)
    assert key(copy) == base


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck missing (make deps)")
def test_build_script_passes_shellcheck() -> None:
    result = subprocess.run(["shellcheck", "-x", "--severity=style", str(PJSUA2 / "build.sh")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


if __name__ == "__main__" and sys.argv[1:] == ["--child"]:
    child()
