"""DNS-rebinding protection over HTTP: without a shared secret, the Host header must name this server."""
from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from server_harness import build_server_engine, running_server

from server.host_check import HostCheck


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    engine = build_server_engine(tmp_path_factory.mktemp("hosts"), allowed_hosts=("My.Box",))
    with running_server(engine) as base:  # no shared secret: the Host check is on
        yield base


@pytest.mark.parametrize(
    "host", ["localhost", "LOCALHOST:1234", "127.0.0.1", "127.0.0.1:8000", "127.0.0.2", "[::1]:8000", "my.box",
             "my.box.:8000"],
)
def test_own_names_are_served(url: str, host: str) -> None:
    assert httpx.get(url + "/basilisk/ping", headers={"Host": host}).text == "pong"
    assert httpx.get(url + "/v1/models", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io",
                                  "10.1.2.3", "my.box.evil.example"])
def test_other_hosts_are_refused(url: str, host: str) -> None:
    basilisk = httpx.post(url + "/basilisk/infer", json={"prompt": "x"}, headers={"Host": host})
    assert basilisk.status_code == 403 and f"names {host.partition(':')[0]!r}" in basilisk.text
    openai = httpx.post(url + "/v1/completions", json={"prompt": "x"}, headers={"Host": host})
    assert openai.status_code == 403 and "Host" in openai.json()["error"]["message"]


@pytest.mark.parametrize(
    "bound, allowed, host, ok",
    [
        ("0.0.0.0", (), "192.168.1.5", True),  # bound to every address: any address, never a name
        ("0.0.0.0", (), "files.example", False),
        ("::", (), "fe80::1", True),
        ("192.168.1.5", (), "192.168.1.5", True),
        ("192.168.1.5", (), "192.168.1.6", False),
        ("myhost", (), "myhost", True),
        ("127.0.0.1", ("*",), "anything.example", True),
    ],
)
def test_host_check_rules(bound: str, allowed: tuple[str, ...], host: str, ok: bool) -> None:
    assert HostCheck(app=None, bound_host=bound, allowed_hosts=allowed).allows(host) is ok  # type: ignore[arg-type]
