"""DNS discovery: a Kubernetes headless Service name resolves to one address per ready engine pod."""

from __future__ import annotations

import asyncio
import logging
import socket

logger = logging.getLogger(__name__)


def split_host_port(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"--discover wants HOST:PORT, got {target!r}")
    if not 1 <= int(port) <= 65535:  # port 0 was taken, then no replica ever answered
        raise ValueError(f"--discover {target!r}: the port must be in 1-65535")
    return host.strip("[]"), int(port)


async def resolve(target: str) -> list[str]:
    """Base URLs of every address `HOST:PORT` resolves to (empty when the name does not resolve)."""
    host, port = split_host_port(target)
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        logger.warning("cannot resolve %s: %s", host, e)
        return []
    urls = set()
    for family, _, _, _, sockaddr in infos:
        addr = sockaddr[0]
        urls.add(f"http://[{addr}]:{port}" if family == socket.AF_INET6 else f"http://{addr}:{port}")
    return sorted(urls)
