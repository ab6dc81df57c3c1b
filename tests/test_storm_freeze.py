"""Freezing a settled connect storm out of the garbage collector (``StormFreezer``)."""

import gc

import pytest
from twisted.internet.task import Clock

from elevgw.south.storm_freeze import StormFreezer


class Fleet:
    def __init__(self):
        self.count = 0
        self.hooks = []

    def end(self, n):
        self.count -= n
        for _ in range(n):
            for hook in list(self.hooks):
                hook(object(), "closed")


@pytest.fixture
def fleet():
    fleet = Fleet()
    yield fleet
    gc.unfreeze()


def started(fleet, clock):
    freezer = StormFreezer(lambda: fleet.count, fleet.hooks, clock, interval=5, min_growth=1000)
    freezer.startService()
    return freezer


def test_a_storm_is_frozen_once_it_stops_growing(fleet):
    clock = Clock()
    freezer = started(fleet, clock)
    for count in (3000, 9000, 15000):  # still connecting: no freeze
        fleet.count = count
        clock.advance(5)
        assert freezer.freezes == 0
    kept = [object() for _ in range(10)]  # noqa: F841 (alive across the freeze)
    clock.advance(5)  # settled
    assert freezer.freezes == 1 and freezer.frozen_sessions == 15000
    assert gc.get_freeze_count() > 0
    clock.advance(5)
    assert freezer.freezes == 1  # nothing new to freeze
    freezer.stopService()
    assert fleet.hooks == []


def test_a_small_trickle_of_devices_is_not_worth_a_freeze(fleet):
    clock = Clock()
    freezer = started(fleet, clock)
    fleet.count = 500
    clock.advance(30)
    assert freezer.freezes == 0
    freezer.stopService()


def test_after_a_quarter_of_the_frozen_sessions_ended_it_thaws_collects_and_freezes_again(
    fleet,
):
    clock = Clock()
    freezer = started(fleet, clock)
    fleet.count = 8000
    clock.advance(5)
    clock.advance(5)
    assert freezer.freezes == 1

    class Cycle:
        pass

    garbage = Cycle()
    garbage.me = garbage  # cyclic garbage, frozen with the storm
    gc.freeze()
    del garbage
    fleet.end(1999)  # below a quarter (2000): keep frozen
    clock.advance(5)
    assert freezer.thaws == 0
    fleet.end(1)
    clock.advance(5)
    assert freezer.thaws == 1 and freezer.ended_since_freeze == 0
    assert not any(type(o) is Cycle for o in gc.get_objects())
    assert gc.get_freeze_count() > 0  # the survivors are frozen again
    freezer.stopService()


def test_a_failing_check_is_logged_and_the_loop_goes_on(fleet):
    clock = Clock()
    calls = []

    def sessions():
        calls.append(1)
        raise RuntimeError("registry broken")

    freezer = started(fleet, clock)
    freezer._sessions = sessions
    clock.advance(5)
    clock.advance(5)
    assert len(calls) == 2 and freezer.running
    freezer.stopService()
