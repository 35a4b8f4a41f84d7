"""The house's seams (../shared/DESIGN.md, "Where things live"): a client's import path loads
neither boto3 nor the development stack, and a worker's does not load the development stack."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _loaded_after(statement: str) -> set[str]:
    probe = f"import sys, json\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_a_client_imports_neither_boto3_nor_the_dev_stack() -> None:
    loaded = _loaded_after("import uploader, uploader.client")
    assert "boto3" not in loaded and "botocore" not in loaded
    assert not {m for m in loaded if m.startswith("uploader.dev")}


@pytest.mark.parametrize("module", ["workers.app", "workers.tasks", "uploader.cli"])
def test_workers_and_the_cli_do_not_import_the_dev_stack(module: str) -> None:
    loaded = _loaded_after(f"import {module}")
    assert not {m for m in loaded if m.startswith("uploader.dev")}, module
