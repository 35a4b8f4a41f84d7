"""A live progress bar for an upload, fed from the checkpoint (works from any machine that can
reach Redis, whichever workers do the uploading)."""

from __future__ import annotations

from collections.abc import Iterable

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from uploader.client import UploadStatus


def show_progress(statuses: Iterable[UploadStatus], console: Console | None = None) -> UploadStatus | None:
    """Render bytes done, rate, ETA and parts done until ``statuses`` ends; return the last one."""
    last = None
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("parts {task.fields[parts]}"),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("starting", total=None, parts="-")
        for status in statuses:
            last = status
            progress.update(
                task,
                description=f"{status.state} (will resume)" if status.retry_pending else status.state,
                total=max(status.size, 1),
                completed=status.bytes_done if status.size else (1 if status.state == "completed" else 0),
                parts=f"{status.parts_done}/{status.part_count}",
            )
    return last
