"""Numeric recipe fields that carry the values they can mean: `n: int = ranged(20, "[2, inf)")`. recipe.py checks
every read (file, override, CLI flag) against the field's `Range`; the tests try one value beyond each bound."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Range:
    """The values a numeric field can mean: `Range.parse("(0, 1]")`; `inf` = no bound on that side.

    A float must also be finite (TOML allows `inf` and `nan`). `why` is said in the error after the rule."""

    lo: float
    hi: float
    lo_open: bool
    hi_open: bool
    why: str = ""

    @classmethod
    def parse(cls, interval: str, why: str = "") -> "Range":
        lo, hi = (float(x) for x in interval[1:-1].split(","))
        return cls(lo, hi, interval[0] == "(", interval[-1] == ")", why)

    def __contains__(self, v: float) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        return (v > self.lo if self.lo_open else v >= self.lo) and (v < self.hi if self.hi_open else v <= self.hi)

    def rule(self) -> str:
        """">= 2", "> 0", "in (0, 1]", "in [0, 4294967295]" (ints print as ints)."""
        num = lambda x: str(int(x)) if float(x).is_integer() else repr(x)  # noqa: E731
        if self.hi == math.inf:
            text = f"{'>' if self.lo_open else '>='} {num(self.lo)}"
        else:
            text = f"in {'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"
        return text + (f" ({self.why})" if self.why else "")

    def beyond(self, typ: type) -> list[float]:
        """One value just outside each finite bound, and for floats the non-finite ones (what the tests try)."""
        out = []
        if math.isfinite(self.lo):
            out.append(self.lo if self.lo_open else (int(self.lo) - 1 if typ is int else math.nextafter(self.lo, -math.inf)))
        if math.isfinite(self.hi):
            out.append(self.hi if self.hi_open else (int(self.hi) + 1 if typ is int else math.nextafter(self.hi, math.inf)))
        out = [int(v) if typ is int else float(v) for v in out]
        return out + ([math.inf, -math.inf, math.nan] if typ is float else [])


def ranged(default: float, interval: str, why: str = "") -> Any:
    """A numeric field with the values it can mean: `n: int = ranged(20, "[2, inf)")`; checked on every read."""
    return field(default=default, metadata={"range": Range.parse(interval, why)})
