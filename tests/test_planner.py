"""Unit and property tests for uploader.planner (pure; no services needed)."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from uploader.errors import InvalidRequest
from uploader.planner import (
    DEFAULT_PART_SIZE,
    MAX_OBJECT_SIZE,
    MAX_PART_SIZE,
    MAX_PARTS,
    MIN_PART_SIZE,
    PartPlan,
    format_size,
    parse_size,
    plan_parts,
    validate_part_size,
)

# Literal units, written out here rather than imported, so a wrong constant in the module fails.
KIB = 1024
MIB = 1024**2
GIB = 1024**3
TIB = 1024**4

PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def test_constants_match_s3_limits() -> None:
    assert MIN_PART_SIZE == 5 * MIB
    assert MAX_PART_SIZE == 5 * GIB
    assert MAX_PARTS == 10_000
    assert MAX_OBJECT_SIZE == 5 * TIB
    assert DEFAULT_PART_SIZE == 8 * MIB


# Sizes near the interesting boundaries (multiples of the default part, of MiB, of the
# 10,000-part threshold) plus anything in 0..5 TiB.
_boundary_sizes = st.builds(
    lambda base, delta: min(max(base + delta, 0), 5 * TIB),
    st.sampled_from([0, 8 * MIB, 8 * MIB * MAX_PARTS, 5 * MIB * MAX_PARTS, 100 * GIB, 1 * TIB, 5 * TIB])
    | st.integers(0, 5 * TIB // MIB).map(lambda n: n * MIB),
    st.integers(-2, 2),
)
sizes = st.integers(0, 5 * TIB) | _boundary_sizes


def check_plan_invariants(plan: PartPlan, size: int) -> None:
    assert plan.size == size
    assert 1 <= plan.count <= MAX_PARTS
    assert MIN_PART_SIZE <= plan.part_size <= MAX_PART_SIZE
    total = 0
    expected_offset = 0
    for number in range(1, plan.count + 1):
        offset, length = plan.part_range(number)
        assert offset == expected_offset, f"part {number} not contiguous"
        if number < plan.count:
            assert length == plan.part_size, f"non-last part {number} has {length} bytes"
        total += length
        expected_offset = offset + length
    assert total == size
    assert expected_offset == size
    last = plan.part_range(plan.count)[1]
    assert last == plan.last_part_size
    if size == 0:
        assert plan.count == 1 and last == 0
    else:
        assert 1 <= last <= plan.part_size


@PROPS
@given(size=sizes)
@example(size=0)
@example(size=1)
@example(size=5 * TIB)
@example(size=8 * MIB * MAX_PARTS)
@example(size=8 * MIB * MAX_PARTS + 1)
def test_default_plan_invariants(size: int) -> None:
    plan = plan_parts(size)
    check_plan_invariants(plan, size)
    if ceil_div(size, 8 * MIB) <= MAX_PARTS:
        assert plan.part_size == 8 * MIB, "default 8 MiB must be used when it fits"
    else:
        # Grown to the smallest whole MiB that fits in 10,000 parts.
        assert plan.part_size % MIB == 0
        assert ceil_div(size, plan.part_size) <= MAX_PARTS
        assert ceil_div(size, plan.part_size - MIB) > MAX_PARTS


@PROPS
@given(size=sizes, default=st.integers(1, 8 * GIB))
def test_custom_default_is_clamped_and_still_fits(size: int, default: int) -> None:
    plan = plan_parts(size, default_part_size=default)
    check_plan_invariants(plan, size)


@PROPS
@given(
    size=st.integers(0, 5 * TIB) | _boundary_sizes,
    part_size=st.integers(5 * MIB, 5 * GIB) | st.integers(5 * MIB, 600 * MIB),
)
@example(size=MAX_PARTS * 5 * MIB, part_size=5 * MIB)  # exactly 10,000 parts: allowed
@example(size=MAX_PARTS * 5 * MIB + 1, part_size=5 * MIB)  # 10,001 parts: refused
@example(size=5 * TIB, part_size=5 * GIB)
@example(size=0, part_size=5 * MIB)
def test_explicit_part_size_used_exactly_or_refused(size: int, part_size: int) -> None:
    needed = max(1, ceil_div(size, part_size))
    if needed <= MAX_PARTS:
        plan = plan_parts(size, part_size)
        assert plan.part_size == part_size
        assert plan.count == needed
        check_plan_invariants(plan, size)
    else:
        with pytest.raises(InvalidRequest) as info:
            plan_parts(size, part_size)
        message = str(info.value)
        assert "10000" in message or "10,000" in message
        assert "at least" in message


def _suggested_size(message: str) -> int:
    match = re.search(r"part size of at least (.+)$", message)
    assert match, message
    return parse_size(match.group(1))


@settings(max_examples=60, deadline=None)
@given(size=st.integers(5 * MIB * MAX_PARTS + 1, 5 * TIB))
@example(size=50001 * MIB)
def test_too_many_parts_suggestion_actually_works(size: int) -> None:
    with pytest.raises(InvalidRequest) as info:
        plan_parts(size, MIN_PART_SIZE)
    suggested = _suggested_size(str(info.value))
    plan = plan_parts(size, suggested)  # must not raise
    assert plan.count <= MAX_PARTS


def test_too_many_parts_suggestion_when_it_is_exact() -> None:
    # A size whose smallest fitting part is exactly 6 MiB, so the suggestion needs no rounding.
    size = MAX_PARTS * 6 * MIB
    with pytest.raises(InvalidRequest) as info:
        plan_parts(size, MIN_PART_SIZE)
    message = str(info.value)
    assert "10000" in message
    assert str(ceil_div(size, MIN_PART_SIZE)) in message  # the part count it would need
    suggested = _suggested_size(message)
    assert suggested == 6 * MIB
    assert plan_parts(size, suggested).count == MAX_PARTS


@pytest.mark.parametrize(
    "part_size",
    [0, 1, -1, MIN_PART_SIZE - 1, MAX_PART_SIZE + 1, 10 * GIB, -MIN_PART_SIZE],
)
def test_out_of_range_part_size_refused(part_size: int) -> None:
    for call in (lambda: validate_part_size(part_size), lambda: plan_parts(100 * MIB, part_size)):
        with pytest.raises(InvalidRequest) as info:
            call()
        assert "5 MiB..5 GiB" in str(info.value)


@pytest.mark.parametrize("part_size", [MIN_PART_SIZE - 1, MAX_PART_SIZE + 1])
def test_out_of_range_message_does_not_show_an_in_range_size(part_size: int) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate_part_size(part_size)
    shown = re.match(r"part size (.+?) is outside", str(info.value))
    assert shown, str(info.value)
    try:
        value = parse_size(shown.group(1))
    except InvalidRequest:
        return  # not a readable size at all: at least it does not claim an in-range value
    assert not MIN_PART_SIZE <= value <= MAX_PART_SIZE


@pytest.mark.parametrize("part_size", [True, False, "8388608", "8MiB", 8.0 * MIB, [8 * MIB]])
def test_non_int_part_size_refused(part_size: object) -> None:
    with pytest.raises(InvalidRequest, match="whole number of bytes"):
        validate_part_size(part_size)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest):
        plan_parts(100 * MIB, part_size)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [-1, -5 * MIB, 5 * TIB + 1, 6 * TIB])
def test_impossible_sizes_refused(size: int) -> None:
    with pytest.raises(InvalidRequest):
        plan_parts(size)
    with pytest.raises(InvalidRequest):
        plan_parts(size, 8 * MIB)


def test_zero_byte_source_is_one_empty_part() -> None:
    for plan in (plan_parts(0), plan_parts(0, 5 * MIB)):
        assert plan.count == 1
        assert plan.part_range(1) == (0, 0)
        assert plan.last_part_size == 0


@PROPS
@given(size=sizes, data=st.data())
def test_part_range_out_of_bounds_raises(size: int, data: st.DataObject) -> None:
    plan = plan_parts(size)
    bad = data.draw(st.integers(max_value=0) | st.integers(min_value=plan.count + 1))
    with pytest.raises(ValueError):
        plan.part_range(bad)


# -- parse_size / format_size ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("16MiB", 16 * MIB),
        ("16M", 16 * MIB),
        ("16 MB", 16 * MIB),
        ("16mib", 16 * MIB),
        ("8388608", 8 * MIB),
        ("8388608B", 8 * MIB),
        ("1.5G", 3 * GIB // 2),
        ("1.5 GiB", 3 * GIB // 2),
        ("512K", 512 * KIB),
        ("0.5K", 512),
        ("2T", 2 * TIB),
        ("  7 b  ", 7),
        ("0", 0),
    ],
)
def test_parse_size_accepts(text: str, expected: int) -> None:
    value = parse_size(text)
    assert value == expected
    assert type(value) is int


def test_parse_size_passes_ints_through() -> None:
    assert parse_size(12345) == 12345


@pytest.mark.parametrize("text", ["abc", "", "   ", "1.3", "1.3B", "-5", "5 X", "5 MiBs", "M", "1,5G", "0.1K"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_size(text)


@pytest.mark.parametrize("text", ["16i", "16iB"])
def test_parse_size_rejects_unit_without_prefix(text: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_size(text)


_UNIT_BYTES = {"KiB": KIB, "MiB": MIB, "GiB": GIB, "TiB": TIB}


@PROPS
@given(unit=st.sampled_from(sorted(_UNIT_BYTES.values())), halves=st.integers(2, 2047))
def test_format_parse_round_trip_on_half_units(unit: int, halves: int) -> None:
    size = halves * unit // 2  # shown exactly with one decimal: "N.0 X" or "N.5 X"
    assert parse_size(format_size(size)) == size


@PROPS
@given(size=st.integers(0, 1023))
def test_format_parse_round_trip_on_bytes(size: int) -> None:
    assert format_size(size) == f"{size} B"
    assert parse_size(format_size(size)) == size


@PROPS
@given(size=st.integers(0, 5 * TIB))
def test_format_size_is_close(size: int) -> None:
    text = format_size(size)
    match = re.fullmatch(r"(\d+(?:\.\d)?) (B|KiB|MiB|GiB|TiB)", text)
    assert match, text
    number, unit = float(match.group(1)), match.group(2)
    scale = 1 if unit == "B" else _UNIT_BYTES[unit]
    assert math.isclose(number * scale, size, abs_tol=0.05 * scale + 1e-9)
    # the largest unit whose value stays under 1024
    if unit != "TiB":
        assert number < 1024 or (number == 1024.0 and size < 1024 * scale)
    if unit != "B":
        assert size >= scale
