"""The README's option and profile tables stay true (issue 11: each option documented once).

The "Object options" table has one row per option: its kwarg (the Python keyword and the task
kwarg), its ``uploader submit`` flag, its meaning, and a cell per provider profile. These tests
read that table as plain pipe-separated markdown and check it against the code it describes:
the fields of :class:`uploader.model.ObjectOptions`,
the ``submit`` command's click parameters, and :meth:`Profile.refusal` for every profile. The
"Provider profiles" table is checked against the profiles' wire fields the same way.

A profile cell says which valid values the profile accepts: ``✓`` all, ``✗`` none,
``only `a`, `b``` those, ``all but `a``` the others, ``mapped: `A` (Name), ...`` those, each
sent as the provider's storage class ``Name``.
"""

from __future__ import annotations

import enum
import re
import typing
from pathlib import Path
from typing import Any

import pytest

from uploader.checksums import ChecksumAlgorithm
from uploader.cli import submit
from uploader.model import ObjectOptions
from uploader.storage.adapter import EXPECT_CONTINUE_MIN_BYTES
from uploader.storage.profiles import PROFILES, ExpectContinue, MiB, ProfileName

README = Path(__file__).resolve().parents[1] / "README.md"
#: Every option a request may carry about the object and its transfer.
OPTIONS = tuple(ObjectOptions.model_fields)
PROFILE_COLUMNS = [p.value for p in ProfileName]

#: A valid value of each option that is not an enum (an enum option is tried with every member).
REPRESENTATIVE: dict[str, Any] = {
    "content_type": "text/plain",
    "cache_control": "no-cache",
    "content_disposition": "attachment",
    "content_encoding": "gzip",
    "content_language": "en",
    "expires": "2030-01-31T00:00:00Z",
    "metadata": {"team": "ingest"},
    "tags": {"project": "x"},
    "sse_kms_key_id": "alias/uploads",
    "bucket_key_enabled": True,
    "sse_customer_key": "primary",
    "no_overwrite": True,
    "object_lock_retain_until": "2030-01-31T00:00:00Z",
    "expected_bucket_owner": "123456789012",
}
#: What an option needs beside it to be valid on its own (ObjectOptions' consistency rules).
COMPANIONS: dict[str, dict[str, Any]] = {
    "sse_kms_key_id": {"sse": "aws:kms"},
    "bucket_key_enabled": {"sse": "aws:kms"},
    "object_lock_mode": {"object_lock_retain_until": "2030-01-31T00:00:00Z"},
    "object_lock_retain_until": {"object_lock_mode": "GOVERNANCE"},
}


# -- reading the README ------------------------------------------------------------------------
def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _table(heading: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the first table under ``heading`` (a whole line of the README)."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index(heading)
    while not lines[start].startswith("|"):
        start += 1
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    header, _separator, *rows = (_cells(line) for line in lines[start:end])
    for row in rows:
        assert len(row) == len(header), f"{heading}: a row has {len(row)} cells, the header {len(header)}: {row}"
    return header, rows


def _name(cell: str) -> str:
    """The one backticked name at the start of a first cell: "`seaweedfs` (default)" -> seaweedfs."""
    match = re.match(r"`([^`]+)`", cell)
    assert match, f"the first cell {cell!r} does not start with a `name`"
    return match.group(1)


def _options_table() -> tuple[list[str], dict[str, list[str]]]:
    header, rows = _table("### Object options")
    by_name: dict[str, list[str]] = {}
    for row in rows:
        name = _name(row[0])
        assert name not in by_name, f"option {name} has two rows in the options table"
        by_name[name] = row
    return header, by_name


def _backticked(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


# -- the values an option may take ---------------------------------------------------------------
def _enum_of(option: str) -> type[enum.Enum] | None:
    if option == "checksum_algorithm":
        return ChecksumAlgorithm
    annotation = ObjectOptions.model_fields[option].annotation
    for arg in typing.get_args(annotation) or (annotation,):
        if isinstance(arg, type) and issubclass(arg, enum.Enum):
            return arg
    return None


def _valid_values(option: str) -> list[Any]:
    """Every valid value of an enum option; the representative one of any other."""
    members = _enum_of(option)
    if members is not None:
        return [member.value for member in members]
    assert option in REPRESENTATIVE, f"tests/test_docs.py: give option {option} a valid value in REPRESENTATIVE"
    return [REPRESENTATIVE[option]]


@pytest.mark.parametrize("option", [o for o in OPTIONS if o != "checksum_algorithm"])
def test_the_values_tried_are_valid(option: str) -> None:
    for value in _valid_values(option):
        ObjectOptions.model_validate({option: value, **COMPANIONS.get(option, {})})


# -- the options table -----------------------------------------------------------------------------
def test_every_option_has_exactly_one_row_and_nothing_else_does() -> None:
    header, rows = _options_table()
    assert header == ["kwarg", "CLI flag", "meaning", *PROFILE_COLUMNS]
    assert sorted(rows) == sorted(OPTIONS)
    for name, row in rows.items():
        assert row[2], f"option {name} has no meaning"


def test_no_other_table_row_documents_an_option() -> None:
    """An option is described in the options table only; other tables link to it."""
    counts = {name: 0 for name in OPTIONS}
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("|"):
            first = _cells(line)[0]
            for name in OPTIONS:
                if first == f"`{name}`" or first.startswith(f"`{name}`,"):
                    counts[name] += 1
    assert counts == {name: 1 for name in OPTIONS}


@pytest.mark.parametrize("option", OPTIONS)
def test_the_cli_flag_of_each_row_is_the_options_flag_on_submit(option: str) -> None:
    """The flags named in the row are exactly those of the ``submit`` parameter of that name."""
    _, rows = _options_table()
    params = {param.name: param for param in submit.params}
    assert option in params, f"uploader submit has no parameter for {option}"
    flags = [text for text in _backticked(rows[option][1]) if text.startswith("-")]
    assert flags, f"the row of {option} names no CLI flag"
    param = params[option]
    assert sorted(flags) == sorted([*param.opts, *param.secondary_opts])


def _expected_accepted(option: str, profile: ProfileName, cell: str, values: list[Any]) -> list[Any]:
    """The values ``cell`` says ``profile`` accepts, checked for naming only valid values."""
    listed = _backticked(cell)
    for value in listed:
        assert value in values, f"{option} / {profile.value}: {value!r} is not a valid value"
    if cell == "✓":
        return values
    if cell == "✗":
        return []
    if cell.startswith("only "):
        return [v for v in values if v in listed]
    if cell.startswith("all but "):
        return [v for v in values if v not in listed]
    if cell.startswith("mapped: "):
        sent = dict(re.findall(r"`([^`]+)` \(([^)]+)\)", cell))
        classes = PROFILES[profile].storage_classes
        assert option == "storage_class" and classes is not None
        assert sent == {v: classes[v] for v in sent}, f"{profile.value}: the storage classes sent differ"
        assert any(k != v for k, v in sent.items()), f"{profile.value}: nothing is mapped; write only ..."
        return [v for v in values if v in listed]
    raise AssertionError(f"{option} / {profile.value}: cannot read the cell {cell!r}")


@pytest.mark.parametrize("option", OPTIONS)
def test_profile_cells_agree_with_the_profiles_refusals(option: str) -> None:
    _, rows = _options_table()
    values = _valid_values(option)
    for column, profile in enumerate(ProfileName, start=3):
        cell = rows[option][column]
        expected = _expected_accepted(option, profile, cell, values)
        accepted = []
        for value in values:
            refusal = PROFILES[profile].refusal({option: value})
            if refusal is None:
                accepted.append(value)
            else:
                assert option in refusal and repr(profile.value) in refusal, refusal
        assert accepted == expected, f"{option} / {profile.value}: the README says {cell!r}"


# -- the profiles table ----------------------------------------------------------------------------
def test_profiles_table_agrees_with_the_profiles() -> None:
    header, rows = _table("### Provider profiles")
    assert header[:7] == [
        "profile", "addressing", "default part checksum", "`FULL_OBJECT` checksum", "`Expect: 100-continue`",
        "part rules", "multipart ETag is MD5",
    ]
    assert [_name(row[0]) for row in rows] == PROFILE_COLUMNS
    for row in rows:
        p = PROFILES[ProfileName(_name(row[0]))]
        assert row[1] == p.addressing.value, p.name
        assert row[2] == p.part_checksum.upper(), p.name
        assert row[3] == ("yes" if p.full_object_checksum else "no"), p.name
        if p.expect_continue is ExpectContinue.NEVER:
            assert row[4] == "never", p.name
        else:
            assert row[4] == f"bodies >= {EXPECT_CONTINUE_MIN_BYTES // MiB} MiB", p.name
        assert ("equal parts" in row[5]) == p.parts.equal_parts, p.name
        assert row[6].split()[0] == ("yes" if p.multipart_etag_is_md5 else "no"), p.name
        # Each quirk, without its citation in brackets, is in "worth knowing".
        for quirk in p.quirks:
            assert re.sub(r" \([^)]*\)$", "", quirk) in row[7].replace("`", ""), p.name
