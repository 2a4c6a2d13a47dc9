"""Guards of a TCPStore server through the Python package: a shared secret,
quotas, and metrics read by Prometheus's own parser."""
import datetime
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import distcore
import harness

T = datetime.timedelta


def families(text):
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_only_clients_with_the_secret_get_in():
    server = distcore.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                               secret=b"s3cret-bytes", bind_address="127.0.0.1")
    server.set("k", "v")
    client = distcore.TCPStore("127.0.0.1", server.port, secret="s3cret-bytes", timeout=T(seconds=5))
    assert client.get("k") == b"v"
    with pytest.raises(distcore.DistPermissionError, match="wrong secret"):
        distcore.TCPStore("127.0.0.1", server.port, secret="guess", timeout=T(seconds=5))
    with pytest.raises(distcore.DistPermissionError, match="requires authentication"):
        distcore.TCPStore("127.0.0.1", server.port, timeout=T(seconds=5))
    samples = {(s.name, s.labels.get("reason")): s.value
               for s in families(server.server_metrics())["distcore_connections_refused"].samples}
    assert samples[("distcore_connections_refused_total", "authentication_failed")] == 1


def test_quotas_raise_and_the_store_goes_on():
    server = distcore.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, max_keys=2)
    server.set("a", "1")
    server.add("b", 1)
    with pytest.raises(distcore.DistQuotaError, match="maximum of 2 keys"):
        server.add("c", 1)
    assert server.add("b", 1) == 2
    # A set has no reply: its refusal raises from the next call that reads.
    server.set("c", "3")
    with pytest.raises(distcore.DistQuotaError, match="1 write.*sent earlier.*maximum of 2 keys"):
        server.get("a")
    assert not server.check(["c"])
    with pytest.raises(ValueError):
        distcore.TCPStore("127.0.0.1", 0, is_master=True, max_keys=0)
    with pytest.raises(distcore.DistValueError, match="not a network"):
        distcore.TCPStore("127.0.0.1", 0, is_master=True, allow="10.0.0.1/8")
    with pytest.raises(distcore.DistValueError, match="need a secret"):
        distcore.TCPStore("127.0.0.1", 0, is_master=True, allow_unauthenticated=["10.0.0.0/8"])


def check_exposition(text):
    """Parses `text` with prometheus_client and checks what every scrape has."""
    parsed = families(text)
    assert parsed, text
    for name, family in parsed.items():
        assert name.startswith("distcore_"), name
        assert family.documentation, name
    assert parsed["distcore_requests"].type == "counter"
    assert parsed["distcore_request_duration_seconds"].type == "histogram"
    assert parsed["distcore_connections"].type == "gauge"
    kinds = {s.labels["kind"] for s in parsed["distcore_connections"].samples}
    assert kinds == {"handshake", "pytorch", "distcore"}
    return parsed


def test_the_embedded_server_and_distcore_serve_expose_the_same_metrics():
    server = distcore.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for i in range(5):
        server.set(f"k{i}", "v")
    assert server.get("k0") == b"v"
    parsed = check_exposition(server.server_metrics())
    requests = {s.labels["command"]: s.value for s in parsed["distcore_requests"].samples
                if s.name == "distcore_requests_total"}
    assert requests["set"] == 5
    buckets = [s for s in parsed["distcore_request_duration_seconds"].samples
               if s.name.endswith("_bucket") and s.labels["command"] == "set"]
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == 5
    assert [s.value for s in buckets] == sorted(s.value for s in buckets), "cumulative"

    cli = harness.CliServer(args=["--metrics", "127.0.0.1:0"])
    try:
        url = harness._read_line(cli.proc, "distcore: metrics at").split()[-1]
        client = distcore.TCPStore("127.0.0.1", cli.port, timeout=T(seconds=5))
        client.set("x", "y")
        # The gauges are published after each turn of the server's loop: the
        # SET (which has no reply) shows within a few scrapes.
        deadline = time.monotonic() + 10
        while True:
            with urllib.request.urlopen(url, timeout=10) as r:
                assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                parsed = check_exposition(r.read().decode())
            keys = parsed["distcore_keys"].samples[0].value
            if keys == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert keys == 1
    finally:
        cli.stop()
