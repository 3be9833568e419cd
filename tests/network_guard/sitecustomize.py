"""No connection beyond this machine, in the test process and in every Python process it starts.

The tests put this folder on PYTHONPATH, so each Python subprocess (train.py, a sweep's jobs, DDP
ranks, data loader workers, the MLflow server) imports this file at start-up as `sitecustomize`
and installs the guard. A connect to anything but loopback raises before a packet leaves, and is
appended to the file named by SEM_CLS_TESTS_NETWORK_LOG: a caller that catches the error and
carries on still fails the test that started it.
"""

import ipaddress
import os
import socket

LOG_VARIABLE = "SEM_CLS_TESTS_NETWORK_LOG"
MESSAGE = "a test tried to reach the network"


def is_loopback(address) -> bool:
    if not isinstance(address, tuple):  # a Unix socket's path
        return True
    host = address[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # any other host name


def local_only(connect):
    """`connect` (socket.socket.connect or connect_ex) refusing any non-loopback address."""

    def guarded(sock, address):
        if not is_loopback(address):
            message = f"{MESSAGE}: {address}"
            log = os.environ.get(LOG_VARIABLE)
            if log:
                with open(log, "a") as file:
                    file.write(f"{message} (pid {os.getpid()})\n")
            raise RuntimeError(message)
        return connect(sock, address)

    return guarded


if __name__ == "sitecustomize":  # started by Python in a subprocess, not imported by conftest
    socket.socket.connect = local_only(socket.socket.connect)
    socket.socket.connect_ex = local_only(socket.socket.connect_ex)
