"""Several OpenAI-compatible servers behind one engine (`rollout.urls`): who gets the next request, who is down.

Requests go to the live server with the fewest requests in flight (ties: the one used least so far), so a fast
server takes more of the work and a run's problems are shared out over all of them. A server that fails (refused
connection while another is live; or its `retries` exhausted) is marked down for `DOWN_S` seconds and the request
moves to another live server; when none is left, the request fails. Which server answers does not change what is
sampled: every request carries its own seed (engines/__init__.py), so on deterministic servers the rollouts are
the same for 1 or N servers.
Shortcut: servers are assumed to serve the same model with the same tokenizer; nothing checks it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

DOWN_S = 60.0  # a failed server is left alone this long, then tried again


@dataclass
class Endpoint:
    url: str  # the full .../v1/completions URL
    in_flight: int = 0
    used: int = 0  # requests sent
    failed: int = 0  # times marked down
    down_until: float = 0.0
    last_error: str = ""


class Fleet:
    """Thread-safe choice among endpoints."""

    def __init__(self, urls: list[str]):
        self.endpoints = [Endpoint(u) for u in urls]
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.endpoints)

    def live(self) -> list[Endpoint]:
        now = time.monotonic()
        return [e for e in self.endpoints if e.down_until <= now]

    def acquire(self, avoid: Endpoint | None = None) -> Endpoint | None:
        """The live endpoint to send to (counted in flight until `release`), `avoid` only when it is the last; None
        when every endpoint is down."""
        with self._lock:
            live = self.live()
            if avoid is not None and len(live) > 1:
                live = [e for e in live if e is not avoid]
            if not live:
                return None
            best = min(live, key=lambda e: (e.in_flight, e.used))
            best.in_flight += 1
            best.used += 1
            return best

    def release(self, e: Endpoint) -> None:
        with self._lock:
            e.in_flight -= 1

    def others_live(self, e: Endpoint) -> bool:
        with self._lock:
            return any(x is not e for x in self.live())

    def mark_down(self, e: Endpoint, why: str) -> None:
        with self._lock:
            e.down_until, e.last_error = time.monotonic() + DOWN_S, why
            e.failed += 1

    def describe(self) -> str:
        return ", ".join(f"{e.url} ({e.last_error or 'not tried'})" for e in self.endpoints)
