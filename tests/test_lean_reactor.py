"""The lean event dispatch (``elevgw.south.lean_reactor``): Twisted's epoll loop without a
logging context per event, installed only where it mirrors Twisted's own."""

import socket

import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet.abstract import FileDescriptor
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.testing import MemoryReactorClock

from elevgw.south import lean_reactor
from elevgw.south.lean_reactor import LeanReactorService
from wsclient import connect_device


class Reader(FileDescriptor):
    """One end of a socket pair, recording what ``doRead`` saw (or failing on demand)."""

    def __init__(self, reactor, sock, fail=False):
        super().__init__(reactor)
        self.sock = sock
        self.fail = fail
        self.read = []
        self.lost = []

    def fileno(self):
        return self.sock.fileno()

    def doRead(self):
        if self.fail:
            raise RuntimeError("a protocol bug")
        self.read.append(self.sock.recv(100))

    def connectionLost(self, reason):
        self.lost.append(reason)

    def logPrefix(self):
        return "TestReader"


def test_twisted_s_do_poll_is_the_one_the_lean_dispatch_mirrors():
    """Fails when a Twisted upgrade changes ``EPollReactor.doPoll``: compare the new one with
    ``lean_do_poll``, then update ``KNOWN_DO_POLL``."""
    assert lean_reactor.known_do_poll()


def test_events_are_dispatched_and_failures_logged_as_twisted_does(caplog):
    reactor = EPollReactor()
    try:
        assert lean_reactor.install(reactor)
        assert reactor.doIteration.__func__ is lean_reactor.lean_do_poll
        a, b = socket.socketpair()
        good = Reader(reactor, a)
        reactor.addReader(good)
        b.send(b"ping")
        reactor.doIteration(0.5)
        assert good.read == [b"ping"]

        c, d = socket.socketpair()
        bad = Reader(reactor, c, fail=True)
        reactor.addReader(bad)
        d.send(b"boom")
        errors = []
        from twisted.python import log

        log.addObserver(errors.append)
        try:
            reactor.doIteration(0.5)
        finally:
            log.removeObserver(errors.append)
        # _doReadOrWrite logs the failure and drops the connection; the loop goes on.
        assert bad.lost and "a protocol bug" in str(bad.lost[0].value)
        assert any(e.get("isError") for e in errors)
        b.send(b"again")
        reactor.doIteration(0.5)
        assert good.read == [b"ping", b"again"]
        for s in (a, b, c, d):
            s.close()
    finally:
        lean_reactor.uninstall(reactor)
        assert "doIteration" not in vars(reactor) and "doPoll" not in vars(reactor)
        reactor._poller.close()


def test_only_epoll_reactors_get_it_and_the_last_user_restores_twisted_s():
    assert lean_reactor.install(MemoryReactorClock()) is False
    reactor = EPollReactor()
    try:
        first, second = LeanReactorService(reactor), LeanReactorService(reactor)
        first.startService()
        second.startService()
        first.stopService()
        assert "doIteration" in vars(reactor)
        second.stopService()
        assert "doIteration" not in vars(reactor)
    finally:
        reactor._poller.close()


def test_an_unknown_do_poll_is_left_alone(monkeypatch):
    monkeypatch.setattr(lean_reactor, "KNOWN_DO_POLL", "0" * 64)
    reactor = EPollReactor()
    try:
        assert lean_reactor.install(reactor) is False
        assert "doIteration" not in vars(reactor)
    finally:
        reactor._poller.close()


@pytest_twisted.ensureDeferred
async def test_a_gateway_serves_devices_on_the_lean_dispatch(gateway):
    service = LeanReactorService(global_reactor)
    service.startService()
    try:
        assert service.installed == isinstance(global_reactor, EPollReactor)
        creds = await gateway.register()
        device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
        for _ in range(3):
            assert (await device.request({"type": "heartbeat"}))["type"] == "pong"
        await device.close()
    finally:
        service.stopService()
    assert "doIteration" not in vars(global_reactor)
