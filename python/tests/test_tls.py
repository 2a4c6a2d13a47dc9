"""TLS between TCPStore handles through the Python package: a TLS server and
its clients, refusals (in clear, a CA that does not vouch for the server, a
wrong server name, mutual TLS without an accepted certificate) and options
that do not go together. The certificates are tests/tls's."""
import datetime
import os
import pathlib

import pytest

import distcore

T = datetime.timedelta
TLS = pathlib.Path(__file__).resolve().parent.parent.parent / "tests" / "tls"
CA, OTHER_CA = TLS / "ca.pem", TLS / "other-ca.pem"
SERVER_CERT, SERVER_KEY = TLS / "server.pem", TLS / "server.key"
CLIENT_CERT, CLIENT_KEY = TLS / "client.pem", TLS / "client.key"
OTHER_CERT, OTHER_KEY = TLS / "other-client.pem", TLS / "other-client.key"


def tls_server(**kwargs):
    """A TLS server on an ephemeral loopback port; its own handle connects over TLS."""
    return distcore.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=T(seconds=10),
                             bind_address="127.0.0.1", tls_cert=SERVER_CERT, tls_key=SERVER_KEY, tls_ca=CA, **kwargs)


def client(port, **kwargs):
    return distcore.TCPStore("127.0.0.1", port, timeout=T(seconds=5), **kwargs)


def test_a_tls_server_and_its_clients_share_the_store():
    with tls_server() as server:
        server.set("k", "v")
        big = os.urandom(3 * 1024 * 1024)
        # Paths as str and as bytes work as well as os.PathLike.
        with client(server.port, tls_ca=str(CA)) as c, client(server.port, tls_ca=os.fsencode(CA)) as c2:
            assert c.get("k") == b"v"
            c.set("big", big)
            assert server.get("big") == big
            assert c2.get("big") == big
            server.set("back", big[::-1])
            assert c.get("back") == big[::-1]
            assert c.add("n", 2) == 2 and server.add("n", 1) == 3
        # The name the server's certificate is checked against.
        with client(server.port, tls_ca=CA, tls_server_name="localhost") as c:
            assert c.get("k") == b"v"


def test_a_client_in_clear_or_trusting_another_ca_is_refused():
    with tls_server() as server:
        with pytest.raises(distcore.DistPermissionError, match="only over TLS"):
            client(server.port)
        with pytest.raises(distcore.DistPermissionError, match="certificate") as e:
            client(server.port, tls_ca=OTHER_CA)
        assert e.value.status == distcore.Status.PERMISSION_DENIED
        with pytest.raises(distcore.DistPermissionError, match="example.org"):
            client(server.port, tls_ca=CA, tls_server_name="example.org")
        server.set("still", "serving")
        with client(server.port, tls_ca=CA) as c:
            assert c.get("still") == b"serving"


def test_a_tls_client_of_a_server_in_clear_is_refused():
    with distcore.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, bind_address="127.0.0.1") as server:
        with pytest.raises(distcore.DistError) as e:
            distcore.TCPStore("127.0.0.1", server.port, timeout=T(seconds=2), tls_ca=CA)
        assert isinstance(e.value, (distcore.DistPermissionError, distcore.DistNetworkError)), e.value
        assert "TLS" in str(e.value)


def test_mutual_tls_lets_in_only_clients_with_a_certificate_from_the_client_ca():
    with tls_server(tls_client_ca=CA) as server:
        server.set("k", "v")
        with client(server.port, tls_ca=CA, tls_cert=CLIENT_CERT, tls_key=CLIENT_KEY) as c:
            assert c.get("k") == b"v"
        with pytest.raises(distcore.DistPermissionError, match="TLS"):
            client(server.port, tls_ca=CA)
        with pytest.raises(distcore.DistPermissionError, match="TLS"):
            client(server.port, tls_ca=CA, tls_cert=OTHER_CERT, tls_key=OTHER_KEY)


@pytest.mark.parametrize("kwargs", [
    {"is_master": True, "tls_cert": SERVER_CERT},
    {"is_master": True, "tls_key": SERVER_KEY},
    {"tls_cert": CLIENT_CERT, "tls_ca": CA},
    {"tls_cert": CLIENT_CERT, "tls_key": CLIENT_KEY},
    {"tls_server_name": "localhost"},
    {"is_master": True, "tls_client_ca": CA},
    {"tls_ca": TLS / "no-such-ca.pem"},
    {"tls_ca": SERVER_KEY},
    {"is_master": True, "tls_cert": SERVER_CERT, "tls_key": CLIENT_KEY},
], ids=["cert-without-key", "key-without-cert", "client-cert-without-key", "client-cert-without-ca",
        "server-name-without-ca", "client-ca-without-cert", "missing-file", "not-a-certificate", "another-key"])
def test_options_that_do_not_go_together_are_value_errors(kwargs):
    with pytest.raises(distcore.DistValueError) as e:
        distcore.TCPStore("127.0.0.1", 0, wait_for_workers=False, timeout=T(seconds=5), bind_address="127.0.0.1",
                          **kwargs)
    assert isinstance(e.value, ValueError)
    assert e.value.status == distcore.Status.INVALID_ARGUMENT


def test_a_path_with_a_null_byte_is_refused_before_the_call():
    with pytest.raises(ValueError, match="tls_ca has an embedded null byte"):
        client(1, tls_ca=str(CA) + "\0.txt")
