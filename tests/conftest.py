"""Shared test fixtures."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make every outbound TCP/UDP connection attempt fail, as on the offline training machines."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError("network access attempted in a test that runs offline")

    def guarded(real: Any) -> Any:
        def method(self: socket.socket, address: Any) -> Any:
            if self.family == socket.AF_UNIX:  # local IPC is not network access
                return real(self, address)
            return refuse()

        return method

    monkeypatch.setattr(socket.socket, "connect", guarded(socket.socket.connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guarded(socket.socket.connect_ex))
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield
