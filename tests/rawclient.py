"""A plain TCP client for tests that speak HTTP by hand, and a /metrics reader."""

from __future__ import annotations

import treq
from twisted.internet import defer, endpoints, protocol, reactor


class RawClient(protocol.Protocol):
    """Sends what it is told and keeps what it gets; ``lost`` fires with all of it."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.lost.callback(self.received)


async def raw_connect(port: int) -> RawClient:
    client = RawClient()
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    await endpoints.connectProtocol(endpoint, client)
    return client


async def raw_request(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send ``data`` on a new connection; everything received until the server closes it."""
    client = await raw_connect(port)
    client.transport.write(data)
    return await client.lost.addTimeout(timeout, reactor)


async def metric(gateway, name: str, **labels) -> float:
    """One sample of the gateway's ``/metrics`` (0 when absent)."""
    response = await treq.get(gateway.base + "/metrics", reactor=reactor, timeout=10)
    text = (await response.content()).decode()
    wanted = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "} "
    for line in text.splitlines():
        if line.startswith(wanted):
            return float(line.split()[-1])
    return 0.0
