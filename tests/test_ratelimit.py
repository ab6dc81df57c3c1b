"""The per-device token bucket and limits on a Clock: burst, refill, warn once, then close."""

import pytest
from twisted.internet.task import Clock

from elevgw.core.ratelimit import DeviceLimits, TokenBucket, Verdict


def test_bucket_allows_the_burst_then_refills_at_the_rate():
    clock = Clock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock)
    assert all(bucket.take() for _ in range(5))
    assert not bucket.take()
    clock.advance(0.1)  # one token
    assert bucket.take()
    assert not bucket.take()
    clock.advance(60)  # never more than the burst saved up
    assert sum(bucket.take() for _ in range(20)) == 5


def test_bucket_takes_the_time_the_caller_already_read():
    clock = Clock()
    bucket = TokenBucket(rate=1, burst=1, clock=clock)
    assert bucket.take(0.0)
    assert not bucket.take(0.5)
    assert bucket.take(1.5)


@pytest.mark.parametrize("rate, burst", [(0, 5), (-1, 5), (5, 0)])
def test_bucket_refuses_limits_that_admit_nothing(rate, burst):
    with pytest.raises(ValueError):
        TokenBucket(rate, burst, Clock())


def test_a_device_over_its_rate_is_warned_once_then_closed_if_it_goes_on():
    clock = Clock()
    limits = DeviceLimits(rate=10, burst=5, clock=clock)
    verdicts = [limits.check_frame() for _ in range(5)]
    assert verdicts == [Verdict.ALLOW] * 5
    assert limits.check_frame() is Verdict.WARN
    # Another burst's worth over the limit is dropped quietly, the next one closes.
    assert [limits.check_frame() for _ in range(5)] == [Verdict.DROP] * 5
    assert limits.check_frame() is Verdict.CLOSE


def test_a_flood_at_twice_the_rate_is_closed_too():
    clock = Clock()
    limits = DeviceLimits(rate=10, burst=5, clock=clock)
    verdicts = []
    for _ in range(200):  # 20 frames a second for 10 s
        verdicts.append(limits.check_frame())
        clock.advance(0.05)
        if verdicts[-1] is Verdict.CLOSE:
            break
    assert Verdict.WARN in verdicts and verdicts[-1] is Verdict.CLOSE
    assert verdicts.count(Verdict.WARN) == 1


def test_a_device_that_backs_off_is_forgiven():
    clock = Clock()
    limits = DeviceLimits(rate=10, burst=5, clock=clock)
    for _ in range(6):
        limits.check_frame()
    assert limits.warned
    clock.advance(1)  # the bucket refills: the device slowed down
    assert limits.check_frame() is Verdict.ALLOW
    assert not limits.warned
    for _ in range(4):
        limits.check_frame()
    assert limits.check_frame() is Verdict.WARN  # a new warning, not a close


def test_reading_pauses_past_the_pending_writes_and_resumes_half_drained():
    limits = DeviceLimits(rate=10, burst=5, clock=Clock())
    assert [limits.write_started(4) for _ in range(5)] == [False] * 4 + [True]
    assert not limits.write_started(4)  # already paused: no second pause
    assert [limits.write_finished(4) for _ in range(4)] == [False, False, False, True]
    assert limits.pending_writes == 2 and not limits.paused
