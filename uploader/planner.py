"""Part planning within S3's multipart limits. Pure functions, no I/O.

S3 (and every compatible server we target) requires every part but the last to be between
5 MiB and 5 GiB, and allows at most 10,000 parts. The last part may be smaller, down to 0 bytes
only when it is the only part.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from uploader.errors import InvalidRequest
from uploader.storage.profiles import PartRules

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

#: Smallest part S3 accepts (except the last one).
MIN_PART_SIZE = 5 * MiB
#: Largest part S3 accepts.
MAX_PART_SIZE = 5 * GiB
#: Most parts one multipart upload may have.
MAX_PARTS = 10_000
#: Largest object a multipart upload can produce.
MAX_OBJECT_SIZE = 5 * TiB
#: Part size used when the caller names none.
DEFAULT_PART_SIZE = 8 * MiB


@dataclass(frozen=True)
class PartPlan:
    """How a source of ``size`` bytes is cut: parts ``1..count`` of ``part_size`` bytes, the last
    one ``last_part_size`` bytes."""

    size: int
    part_size: int
    count: int

    @property
    def last_part_size(self) -> int:
        return self.size - self.part_size * (self.count - 1)

    def part_range(self, part_number: int) -> tuple[int, int]:
        """``(offset, length)`` of part ``part_number`` (1-based) in the source."""
        if not 1 <= part_number <= self.count:
            raise ValueError(f"part {part_number} is outside 1..{self.count}")
        offset = (part_number - 1) * self.part_size
        return offset, min(self.part_size, self.size - offset)


def plan_parts(
    size: int, part_size: int | None = None, *, default_part_size: int = DEFAULT_PART_SIZE, rules: PartRules | None = None
) -> PartPlan:
    """Cut ``size`` bytes into parts.

    ``rules`` are the provider profile's (default: S3's). Every plan cuts equal parts but the
    last, which is no larger: what Cloudflare R2 requires (``PartRules.equal_parts``) and what
    :meth:`PartPlan.part_range` relies on; a profile with other limits is checked against them.

    With an explicit ``part_size`` the plan uses it exactly, or raises :class:`InvalidRequest`
    when it is outside 5 MiB..5 GiB or would need more than 10,000 parts. Without one, the
    default is grown (to whole MiB) until the upload fits in 10,000 parts.
    """
    if size < 0:
        raise InvalidRequest(f"source size must not be negative, got {size}")
    if size > MAX_OBJECT_SIZE:
        raise InvalidRequest(f"source is {size} bytes; S3 objects are limited to 5 TiB ({MAX_OBJECT_SIZE} bytes)")
    if rules is not None and part_size is not None and not rules.min_part <= part_size <= rules.max_part:
        raise InvalidRequest(
            f"part size {part_size} bytes is outside this provider's limits of {rules.min_part}..{rules.max_part} bytes per part"
        )
    if part_size is not None:
        validate_part_size(part_size)
        count = max(1, -(-size // part_size))
        if count > MAX_PARTS:
            raise InvalidRequest(
                f"part size {part_size} bytes would need {count} parts for {size} bytes; S3 allows at most "
                f"{MAX_PARTS}: use a part size of at least {smallest_fitting_part_size(size) // MiB}MiB"
            )
        return PartPlan(size=size, part_size=part_size, count=count)
    low = max(MIN_PART_SIZE, rules.min_part) if rules else MIN_PART_SIZE
    high = min(MAX_PART_SIZE, rules.max_part) if rules else MAX_PART_SIZE
    max_parts = min(MAX_PARTS, rules.max_parts) if rules else MAX_PARTS
    chosen = min(max(default_part_size, low), high)
    if -(-size // chosen) > max_parts:
        per_part = -(-size // max_parts)
        chosen = max(low, -(-per_part // MiB) * MiB)
    plan = PartPlan(size=size, part_size=chosen, count=max(1, -(-size // chosen)))
    if rules is not None and rules.equal_parts:
        assert plan.last_part_size <= plan.part_size, "every part but the last is part_size; the last no larger"
    return plan


def smallest_fitting_part_size(size: int) -> int:
    """The smallest whole-MiB part size (at least 5 MiB) that cuts ``size`` bytes into at most
    10,000 parts."""
    per_part = -(-size // MAX_PARTS)
    return max(MIN_PART_SIZE, -(-per_part // MiB) * MiB)


def validate_part_size(part_size: int) -> None:
    """Raise :class:`InvalidRequest` unless ``part_size`` is an int within 5 MiB..5 GiB."""
    if isinstance(part_size, bool) or not isinstance(part_size, int):
        raise InvalidRequest(f"part size must be a whole number of bytes, got {part_size!r}")
    if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
        raise InvalidRequest(
            f"part size {part_size} bytes is outside S3's limits of 5 MiB..5 GiB "
            f"({MIN_PART_SIZE}..{MAX_PART_SIZE} bytes) per part"
        )


_SIZE_RE = re.compile(r"\s*(\d{1,30}(?:\.\d{1,30})?)\s*([kmgt]i?b?|b)?\s*", re.IGNORECASE | re.ASCII)
_UNITS = {"": 1, "b": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB}


def parse_size(text: str | int) -> int:
    """Parse ``"16MiB"``, ``"16M"``, ``"8388608"`` into bytes. Units are binary (1 M = 1 MiB)."""
    if isinstance(text, int):
        return text
    match = _SIZE_RE.fullmatch(text)
    if not match:
        shown = repr(text[:40]) + ("..." if len(text) > 40 else "")
        raise InvalidRequest(f"cannot read {shown} as a size; write e.g. 16MiB or 8388608")
    number, unit = match.groups()
    # Exact arithmetic: a float would turn 30 nines into another number, and 1e400 or
    # a long enough number into infinity.
    value = Fraction(number) * _UNITS[(unit or "").lower()[:1]]
    if value.denominator != 1:
        raise InvalidRequest(f"size {text!r} is not a whole number of bytes")
    return int(value)


def format_size(size: int) -> str:
    """Human-readable binary size: ``8.0 MiB``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
