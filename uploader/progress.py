"""Progress of an upload, fed from the checkpoint (works from any machine that can reach Redis,
whichever workers do the uploading): a live bar on a terminal, a plain line every few seconds
(and at each change of state) when the output is a file or a pipe, so a log shows progress
before the end. Sizes and rates in one unit system, binary (KiB, MiB, GiB)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from uploader.planner import format_size

if TYPE_CHECKING:
    from uploader.client import UploadStatus

#: Seconds between two plain progress lines (when the output is not a terminal).
LINE_EVERY = 10.0


class BinarySpeedColumn(ProgressColumn):
    """The transfer rate in the bar's own units (rich's speed column is decimal, MB/s, beside
    binary sizes)."""

    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        return Text("?/s" if speed is None else f"{format_size(int(speed))}/s", style="progress.data.speed")


def show_progress(
    statuses: Iterable[UploadStatus], console: Console | None = None, *, line_every: float = LINE_EVERY
) -> UploadStatus | None:
    """Show bytes done, rate, ETA and parts done until ``statuses`` ends; return the last one."""
    console = console or Console(stderr=True)
    if not console.is_terminal:
        return _plain_lines(statuses, console, line_every)
    last = None
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        DownloadColumn(binary_units=True),
        BinarySpeedColumn(),
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
                description=_state(status),
                total=max(status.size, 1),
                completed=_done(status) if status.size else (1 if status.state == "completed" else 0),
                parts=f"{status.parts_done}/{status.part_count}",
            )
    return last


def _done(status: UploadStatus) -> int:
    """Bytes recorded, and those of the parts being sent as far as they got."""
    return min(status.size, status.bytes_done + status.bytes_sending)


def _state(status: UploadStatus) -> str:
    return f"{status.state} (will resume)" if status.retry_pending else str(status.state)


def _plain_lines(statuses: Iterable[UploadStatus], console: Console, every: float) -> UploadStatus | None:
    """A line at each change of state and every ``every`` seconds: state, bytes, percent, rate
    since the previous line, parts."""
    last = None
    shown_at, shown_bytes, shown_state = 0.0, 0, ""
    for status in statuses:
        last = status
        now = time.monotonic()
        state = _state(status)
        if state == shown_state and now - shown_at < every:
            continue
        done = _done(status)
        rate = (done - shown_bytes) / (now - shown_at) if shown_at and now > shown_at else None
        percent = f" ({done * 100 // status.size}%)" if status.size else ""
        console.print(
            f"{status.upload_id}: {state} {format_size(done)} of {format_size(status.size)}{percent}"
            + (f", {format_size(int(rate))}/s" if rate is not None and rate > 0 else "")
            + f", parts {status.parts_done}/{status.part_count}",
            highlight=False, markup=False, soft_wrap=True,
        )
        shown_at, shown_bytes, shown_state = now, done, state
    return last
