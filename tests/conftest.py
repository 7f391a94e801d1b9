"""Shared test fixtures."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for training runs: a tiny model gains nothing from more, and busy CPUs make OpenMP crawl."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    """An S3-compatible HTTP server on loopback (moto's), with one empty bucket, for the S3 path.

    Tests talk to it through the real clients (s3fs, boto3, pyarrow), as s3fs's own tests do.
    """
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    info = {
        "endpoint_url": f"http://{host}:{port}",
        "bucket": "finetune-test",
        "region": "us-east-1",
        "access_key_id": "testing",
        "secret_access_key": "testing",
    }
    boto3.client(
        "s3",
        endpoint_url=info["endpoint_url"],
        region_name=info["region"],
        aws_access_key_id=info["access_key_id"],
        aws_secret_access_key=info["secret_access_key"],
    ).create_bucket(Bucket=info["bucket"])
    try:
        yield info
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_storage(s3_server: dict[str, str]) -> Any:
    """``make(base=None)``: a StorageConfig on the S3 server, under its own base prefix (fresh by default)."""
    import uuid

    from finetune.storage import StorageConfig

    def make(base: str | None = None) -> StorageConfig:
        return StorageConfig(
            url=f"s3://{s3_server['bucket']}/{base or uuid.uuid4().hex}",
            endpoint_url=s3_server["endpoint_url"],
            region=s3_server["region"],
            access_key_id=s3_server["access_key_id"],
            secret_access_key=s3_server["secret_access_key"],
        )

    return make
