"""The tests' network guard holds in every Python process a test starts, not only in pytest's."""

import socket
import subprocess
import sys

import pytest

# TEST-NET-1 (RFC 5737): documentation only, and never reached, as the guard raises first.
CONNECT = "import socket; socket.create_connection(('192.0.2.1', 80), timeout=5)"


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_the_test_process_cannot_reach_the_network(no_network):
    with pytest.raises(RuntimeError, match="tried to reach the network"):
        socket.create_connection(("192.0.2.1", 80), timeout=1)
    assert "('192.0.2.1', 80)" in no_network.read_text()
    no_network.unlink()


def test_a_subprocess_reaching_for_the_network_fails_with_the_guards_message(no_network):
    result = python(CONNECT)
    assert result.returncode == 1
    assert "RuntimeError: a test tried to reach the network: ('192.0.2.1', 80)" in result.stderr
    assert "('192.0.2.1', 80)" in no_network.read_text()
    no_network.unlink()  # expected here; in any other test it fails that test


def test_an_attempt_the_subprocess_swallows_is_still_recorded(no_network):
    result = python(f"try:\n    {CONNECT}\nexcept Exception:\n    pass")
    assert result.returncode == 0, result.stderr
    assert "a test tried to reach the network: ('192.0.2.1', 80)" in no_network.read_text()
    no_network.unlink()


def test_loopback_connections_pass(no_network):
    code = (
        "import socket\n"
        "server = socket.create_server(('127.0.0.1', 0))\n"
        "socket.create_connection(server.getsockname(), timeout=5).close()"
    )
    result = python(code)
    assert result.returncode == 0, result.stderr
    assert not no_network.exists()
