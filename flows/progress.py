"""Progress a person can follow on long runs: counts, rates and an ETA, logged at most every few seconds."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("whence")


class Progress:
    def __init__(self, label: str, total: int | None, unit: str = "sequences", every_s: float = 10.0):
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.start = time.monotonic()
        self.last_log = self.start
        self.done = 0
        self.tokens = 0
        self.first_at: float | None = None  # when the first items arrived, and how many
        self.first_count = 0
        self.last_at: float | None = None

    def advance(self, count: int, tokens: int = 0) -> None:
        self.done += count
        self.tokens += tokens
        now = time.monotonic()
        if count:
            if self.first_at is None:
                self.first_at, self.first_count = now, count
            self.last_at = now
        if now - self.last_log >= self.every_s:
            self.last_log = now
            log.info("%s", self.line())

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def line(self) -> str:
        elapsed = max(self.elapsed, 1e-9)
        rate = self.done / elapsed
        text = f"{self.label}: {self.done:,}"
        if self.total:
            text += f"/{self.total:,} {self.unit} ({100 * self.done / self.total:.0f}%)"
        else:
            text += f" {self.unit}"
        text += f", {rate:,.1f} {self.unit}/s"
        if self.tokens:
            text += f", {self.tokens / elapsed:,.0f} tokens/s"
        if self.total and rate > 0 and self.done < self.total:
            text += f", ETA {format_seconds((self.total - self.done) / rate)}"
        return text

    def steady(self) -> tuple[int, float]:
        """(items, seconds) from the first arrival to the last: the throughput once start-up (actors loading
        models, the first batch going through) is over. (0, 0.0) with fewer than two arrivals."""
        if self.first_at is None or self.last_at == self.first_at:
            return 0, 0.0
        return self.done - self.first_count, self.last_at - self.first_at

    def finish(self) -> float:
        log.info("%s; done in %s", self.line(), format_seconds(self.elapsed))
        return self.elapsed


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
