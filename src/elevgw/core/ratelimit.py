"""Per-device limits: a message-rate token bucket and a bound on unfinished store work.

One device must never cost the others their service. A device may send ``burst`` frames at
once and ``rate`` a second on average. Past that it gets one ``rate_limited`` error frame;
if it goes on (another ``burst`` of frames over the limit before its bucket refills) it is
closed with 1008. A device that has not backed off is counted against the bucket for every
frame, so a flood at twice the rate is closed as surely as one at a thousand times.

A device over its rate is also not read from until its next token is due: its frames wait
in its own socket and TCP window, which costs the gateway nothing, instead of being read,
parsed and dropped at whatever speed the device can send. A device closed for a limit may
not connect again for a cooldown (the gateway's ``cooldown``), so a firmware that reconnects
at once after each close does not get a fresh burst every time.

Apart from the rate, a device whose store writes (logs, snapshots) are still pending beyond
``max_pending_writes`` is not read from until they finish: its frames wait in its own socket
buffer (and then in its own TCP window) instead of in the gateway's memory and the store's
queue, where they would delay every other device's handshake and logs.

Pure bookkeeping on an injected clock: the gateway asks, and acts on the verdict.
"""

from __future__ import annotations

import enum
from typing import Any


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; starts full.

    ``take`` accepts the current time so a caller that already read the clock does not
    read it twice on a hot path.
    """

    __slots__ = ("rate", "burst", "tokens", "_stamp", "_clock")

    def __init__(self, rate: float, burst: float, clock: Any) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self._clock = clock
        self._stamp = clock.seconds()

    def take(self, now: float | None = None) -> bool:
        """Spend one token if there is one; ``False`` means over the limit."""
        if now is None:
            now = self._clock.seconds()
        tokens = self.tokens + (now - self._stamp) * self.rate
        self._stamp = now
        if tokens > self.burst:
            tokens = self.burst
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        return False

    @property
    def full(self) -> bool:
        """Whether the bucket has refilled completely since the last ``take``."""
        return self.tokens + (self._clock.seconds() - self._stamp) * self.rate >= self.burst


class Verdict(enum.Enum):
    """What to do with one frame of a device."""

    ALLOW = "allow"  # handle it
    WARN = "warn"  # drop it and send one rate_limited error frame
    DROP = "drop"  # drop it quietly: the device was warned already
    CLOSE = "close"  # the device went on after the warning: close it with 1008


class DeviceLimits:
    """The limits of one device session: its message rate and its unfinished store writes.

    ``check_frame`` is the one question the frame path asks before handling a frame (text,
    binary or ping), whichever code path parses it.
    """

    __slots__ = (
        "bucket",
        "warned",
        "over_since_warning",
        "pending_writes",
        "paused",
        "rate_resume",
    )

    def __init__(self, rate: float, burst: int, clock: Any) -> None:
        self.bucket = TokenBucket(rate, burst, clock)
        self.warned = False
        self.over_since_warning = 0
        self.pending_writes = 0
        self.paused = False
        #: The timer that resumes reading once a token is due (while over the rate).
        self.rate_resume: Any = None

    def next_token_in(self) -> float:
        """Seconds until the bucket holds one token again."""
        bucket = self.bucket
        return max(0.0, (1.0 - bucket.tokens) / bucket.rate)

    def check_frame(self, now: float | None = None) -> Verdict:
        return self.verdict(self.bucket.take(now))

    def verdict(self, took: bool) -> Verdict:
        """The verdict on a frame for which the bucket gave a token (``took``) or not; a hot
        path may take the token itself and ask only when ``not took or self.warned``."""
        bucket = self.bucket
        if took:
            if self.warned and bucket.tokens >= bucket.burst - 1:
                # Backed off until the bucket refilled: the warning is spent.
                self.warned = False
                self.over_since_warning = 0
            return Verdict.ALLOW
        if not self.warned:
            self.warned = True
            self.over_since_warning = 0
            return Verdict.WARN
        self.over_since_warning += 1
        if self.over_since_warning > bucket.burst:
            return Verdict.CLOSE
        return Verdict.DROP

    def write_started(self, max_pending: int) -> bool:
        """Count one more pending store write; ``True`` if reading should pause now."""
        self.pending_writes += 1
        if not self.paused and self.pending_writes > max_pending:
            self.paused = True
            return True
        return False

    def write_finished(self, max_pending: int) -> bool:
        """One store write is done; ``True`` if reading should resume now (half drained)."""
        self.pending_writes -= 1
        if self.paused and self.pending_writes <= max_pending // 2:
            self.paused = False
            return True
        return False
