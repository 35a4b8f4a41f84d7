"""Scaling across machines, simulated: N worker "hosts" as Linux network namespaces, each behind
its own bandwidth cap, uploading parts of one file. Aggregate throughput should grow close to
linearly with N while the S3 server has headroom.

Topology (all of it created here, named with the fixed prefix ``ubench-scale-``, and deleted
afterwards; leftovers of a killed earlier run are removed before starting):

    ubench-scale-srv   bridge br0 10.231.0.1/24; redis-server and SeaweedFS (weed mini) bound to
                       10.231.0.1; the submitting client (bench/scaling_client.py)
    ubench-scale-hI    veth eth0 10.231.0.(10+I)/24, its peer hI enslaved to br0 in the server
                       namespace; egress capped by a tbf qdisc on eth0; lo up; one
                       `celery -A workers.app worker` (the project's worker, threads pool)

Nothing listens outside these namespaces, and the root namespace gets no interface or route:
the benchmark process talks to the client over a pipe and reads counters with ``tc -n``.

For each N (runs interleaved: 1,2,4 then 4,2,1...), exactly hosts 1..N run a worker; one
upload of the file is submitted and waited for; wall = submit -> the worker's completion stamp.
Each object is checked (size and SHA-256 read back) and deleted. Per host: bytes its tbf sent,
parts it uploaded (from its worker's log), its worker's CPU; and the S3 server's and the whole
machine's CPU during the run, to tell a cap-bound run from a CPU-bound one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import procstat
from bench.rig import BENCH_FLEET_KEY, Rig
from bench.stats import median, rnd
from uploader.dev.localstack import _Process, wait_until, weed_binary, worker_argv

MiB = 1 << 20
PREFIX = "ubench-scale-"
SERVER_NS = PREFIX + "srv"
SUBNET = "10.231.0"
SERVER_IP = f"{SUBNET}.1"
REDIS_PORT = 6379
S3_PORT = 8333
BUCKET = "bench-scaling"
TARGET_HOSTS, TARGET_RATIO = 4, 3.5
REPO = Path(__file__).resolve().parent.parent


def host_ns(i: int) -> str:
    return f"{PREFIX}h{i}"


class SetupError(RuntimeError):
    """The namespaces or qdiscs could not be created here (no privilege, no module...)."""


def _cmd(*argv: str, check: bool = True) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise SetupError(f"`{' '.join(argv)}` failed: {(proc.stderr or proc.stdout).strip()[:500]}")
    return proc.stdout


def unavailable() -> str | None:
    """Why the scenario cannot run on this machine, or ``None``."""
    if not sys.platform.startswith("linux"):
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root (ip netns, veth, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    if shutil.which("redis-server") is None:
        return "redis-server is not installed"
    try:
        weed_binary()
    except RuntimeError as exc:
        return str(exc)
    return None


# -- namespaces ---------------------------------------------------------------------------------
def leftover_namespaces() -> list[str]:
    out = _cmd("ip", "netns", "list", check=False)
    return [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0].startswith(PREFIX)]


def remove_namespaces(log: Any = None) -> None:
    """Delete every namespace with our prefix, after SIGKILLing the processes still inside it
    (started by an earlier, killed run of this scenario: nothing else lives in them)."""
    for name in leftover_namespaces():
        pids = [int(p) for p in _cmd("ip", "netns", "pids", name, check=False).split() if p.isdigit()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if pids and log:
            log(f"  killed {len(pids)} leftover process(es) in namespace {name}")
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and _state(p) != "Z"]
            time.sleep(0.05)
        _cmd("ip", "netns", "del", name, check=False)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


class Topology:
    def __init__(self, hosts: int, rate: int, burst: int, latency_ms: int) -> None:
        self.hosts, self.rate, self.burst, self.latency_ms = hosts, rate, burst, latency_ms

    def up(self) -> None:
        s = SERVER_NS
        _cmd("ip", "netns", "add", s)
        _cmd("ip", "-n", s, "link", "set", "lo", "up")
        _cmd("ip", "-n", s, "link", "add", "br0", "type", "bridge")
        _cmd("ip", "-n", s, "addr", "add", f"{SERVER_IP}/24", "dev", "br0")
        _cmd("ip", "-n", s, "link", "set", "br0", "up")
        for i in range(1, self.hosts + 1):
            h = host_ns(i)
            _cmd("ip", "netns", "add", h)
            _cmd("ip", "-n", h, "link", "set", "lo", "up")
            _cmd("ip", "-n", h, "link", "add", "eth0", "type", "veth", "peer", "name", f"h{i}", "netns", s)
            _cmd("ip", "-n", s, "link", "set", f"h{i}", "master", "br0")
            _cmd("ip", "-n", s, "link", "set", f"h{i}", "up")
            _cmd("ip", "-n", h, "addr", "add", f"{SUBNET}.{10 + i}/24", "dev", "eth0")
            _cmd("ip", "-n", h, "link", "set", "eth0", "up")
            _cmd("tc", "-n", h, "qdisc", "replace", "dev", "eth0", "root", "handle", "1:", "tbf", "rate",
                 f"{self.rate * 8}bit", "burst", str(self.burst), "latency", f"{self.latency_ms}ms")

    def down(self) -> None:
        remove_namespaces()

    @staticmethod
    def tc_stats(i: int) -> dict[str, int]:
        """Counters of host ``i``'s egress qdisc."""
        out = _cmd("tc", "-n", host_ns(i), "-s", "qdisc", "show", "dev", "eth0", check=False)
        m = re.search(r"Sent (\d+) bytes (\d+) pkt \(dropped (\d+), overlimits (\d+)", out)
        if not m:
            return {}
        return {"bytes": int(m[1]), "packets": int(m[2]), "dropped": int(m[3]), "overlimits": int(m[4])}


# -- processes inside namespaces -------------------------------------------------------------------
class NsProcess(_Process):
    """A localstack-style child process (own session, log file) run by ``ip netns exec`` (which
    execs the program itself, so ``pid`` is the program's)."""

    def __init__(self, ns: str, argv: list[str], log_path: Path, env: dict[str, str], cwd: Path | None = None,
                 ready_text: str | None = None) -> None:
        self.ns = ns
        self.ready_text = ready_text
        super().__init__(["ip", "netns", "exec", ns, *argv], log_path, env=env, cwd=cwd)

    def ready(self) -> bool:
        if not self.alive():
            raise RuntimeError(f"{self.argv[4]} in {self.ns} exited: {self.log_text()[-2000:]}")
        return self.ready_text is None or self.ready_text in self.log_text()


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "UPLOADER_"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env.update(extra)
    return env


class Cluster:
    """Redis + SeaweedFS + the client in the server namespace, workers in host namespaces."""

    def __init__(self, rig: Rig, *, concurrency: int, log: Any) -> None:
        self.rig, self.concurrency, self.log = rig, concurrency, log
        self.dir = rig.workdir / "scaling"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.env = _clean_env({
            **rig.aws_env,
            "UPLOADER_BROKER_URL": f"redis://{SERVER_IP}:{REDIS_PORT}/0",
            "UPLOADER_S3_ENDPOINT_URL": f"http://{SERVER_IP}:{S3_PORT}",
            "UPLOADER_SOURCE_ROOTS": str(rig.sources),
            "UPLOADER_FLEET_KEY": BENCH_FLEET_KEY,
            "UPLOADER_RETRY_BACKOFF_MAX": "2",
            "UPLOADER_WORKER_CONCURRENCY": str(concurrency),
        })
        self.redis: NsProcess | None = None
        self.s3: NsProcess | None = None
        self.client: subprocess.Popen | None = None
        self.workers: dict[int, NsProcess] = {}

    def _register(self, proc: NsProcess) -> NsProcess:
        self.rig._services.append(proc)  # stopped by Rig.close too, should anything escape
        return proc

    def start_servers(self) -> None:
        self.redis = self._register(NsProcess(
            SERVER_NS,
            [shutil.which("redis-server") or "redis-server", "--port", str(REDIS_PORT), "--bind", SERVER_IP,
             "--protected-mode", "no", "--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction",
             "--dir", str(self.dir), "--daemonize", "no"],
            self.dir / "redis.log", self.env, ready_text="Ready to accept connections",
        ))
        data = self.dir / "seaweedfs"
        data.mkdir(exist_ok=True)
        ports = iter(range(18000, 18100))
        # weed mini turns S3 authentication on for the key pair in AWS_ACCESS_KEY_ID/SECRET (as the rig's).
        self.s3 = self._register(NsProcess(
            SERVER_NS,
            [weed_binary(), "mini", f"-dir={data}", f"-ip={SERVER_IP}", f"-ip.bind={SERVER_IP}",
             f"-s3.port={S3_PORT}", f"-s3.port.grpc={next(ports)}",
             f"-master.port={next(ports)}", f"-master.port.grpc={next(ports)}",
             f"-volume.port={next(ports)}", f"-volume.port.grpc={next(ports)}",
             f"-filer.port={next(ports)}", f"-filer.port.grpc={next(ports)}",
             f"-admin.port={next(ports)}", f"-admin.port.grpc={next(ports)}", "-admin.ui=false",
             "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.max=5000"],
            self.dir / "seaweedfs.log", self.env, cwd=data,
        ))
        assert self.redis is not None
        wait_until(self.redis.ready, 20, "redis-server in the server namespace")
        self._client_log = open(self.dir / "client.log", "ab")
        self.client = subprocess.Popen(
            ["ip", "netns", "exec", SERVER_NS, sys.executable, "-m", "bench.scaling_client"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._client_log,
            env=self.env, cwd=REPO, text=True, bufsize=1,
        )
        self.rig._children.add(self.client)
        self.request({"op": "ready", "bucket": BUCKET, "timeout": 60}, timeout=90)

    def request(self, req: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.client is not None and self.client.stdin and self.client.stdout
        if self.s3 is not None and not self.s3.alive():
            raise RuntimeError(f"weed mini exited: {self.s3.log_text()[-1500:]}")
        self.client.stdin.write(json.dumps(req) + "\n")
        self.client.stdin.flush()
        ready, _, _ = select.select([self.client.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"the client gave no answer to {req['op']} within {timeout:.0f} s")
        line = self.client.stdout.readline()
        if not line:
            raise RuntimeError("the client exited: " + (self.dir / "client.log").read_text(errors="replace")[-2000:])
        answer = json.loads(line)
        if req["op"] == "ready" and not answer.get("ok"):
            raise RuntimeError(f"servers not ready: {answer.get('error')}")
        return answer

    def ensure_workers(self, n: int) -> float:
        """Exactly hosts 1..n run a worker; returns the seconds it took."""
        t0 = time.perf_counter()
        extra = [i for i in self.workers if i > n]
        for i in extra:
            self.workers[i].kill(signal.SIGTERM)
        for i in extra:
            self.rig.stop_service(self.workers.pop(i))
        started = []
        for i in range(1, n + 1):
            if i not in self.workers:
                argv = worker_argv(concurrency=self.concurrency, hostname=f"bench-scale-h{i}@host{i}", loglevel="INFO")
                self.workers[i] = self._register(NsProcess(
                    host_ns(i), argv, self.dir / f"worker-h{i}-{int(time.time() * 1000)}.log", self.env,
                    cwd=REPO, ready_text=" ready.",
                ))
                started.append(self.workers[i])
        for w in started:
            wait_until(w.ready, 90, f"celery worker in {w.ns}", interval=0.1)
        return time.perf_counter() - t0

    def stop(self) -> None:
        for w in self.workers.values():
            w.kill(signal.SIGTERM)
        for i in list(self.workers):
            self._stop(self.workers.pop(i))
        if self.client is not None:
            try:
                assert self.client.stdin
                self.client.stdin.close()
                self.client.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.client.kill()
                self.client.wait(5)
            self.rig._children.discard(self.client)
            self.client = None
            self._client_log.close()
        for attr in ("s3", "redis"):
            proc = getattr(self, attr)
            if proc is not None:
                self._stop(proc)
                setattr(self, attr, None)

    def _stop(self, proc: NsProcess) -> None:
        try:
            self.rig.stop_service(proc)
        except Exception as exc:  # keep stopping the others
            self.log(f"  warning: stopping {proc.argv[4]} in {proc.ns} failed: {exc}")


# -- measurement ------------------------------------------------------------------------------------
def _machine_cpu() -> tuple[list[int], int]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return fields, os.cpu_count() or 1


def tcp_counters(pid: int) -> dict[str, int]:
    """TCP segment counters of the network namespace ``pid`` lives in (/proc/<pid>/net/snmp)."""
    try:
        lines = [line.split() for line in Path(f"/proc/{pid}/net/snmp").read_text().splitlines() if line.startswith("Tcp:")]
        values = dict(zip(lines[0][1:], (int(v) for v in lines[1][1:]), strict=True))
    except (OSError, IndexError, ValueError):
        return {}
    return {"out_segs": values.get("OutSegs", 0), "retrans_segs": values.get("RetransSegs", 0)}


_LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): ")
_PART_RECEIVED = re.compile(r"Task uploader\.upload_part\[[^\]]+\] received")
_PART_DONE = re.compile(r"Task uploader\.upload_part\[[^\]]+\] succeeded in ([0-9.]+)s")


def _log_epoch(line: str) -> float | None:
    m = _LOG_TIME.match(line)
    if not m:
        return None
    return datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def parse_worker_log(text: str) -> dict[str, Any]:
    """Parts this worker uploaded in a run (from the lines it logged during it)."""
    received: list[float] = []
    done: list[float] = []
    runtimes: list[float] = []
    for line in text.splitlines():
        if _PART_RECEIVED.search(line):
            t = _log_epoch(line)
            if t:
                received.append(t)
        m = _PART_DONE.search(line)
        if m:
            runtimes.append(float(m[1]))
            t = _log_epoch(line)
            if t:
                done.append(t)
    return {
        "parts": len(runtimes),
        "part_seconds_median": rnd(median(runtimes), 2),
        "first_received": min(received) if received else None,
        "last_done": max(done) if done else None,
    }


def measure(cluster: Cluster, n: int, repeat: int, path: Path, sha256: str, part_size: int, timeout: float,
            size: int) -> dict[str, Any]:
    sample: dict[str, Any] = {"hosts": n, "repeat": repeat, "ok": False}
    workers = {i: cluster.workers[i] for i in range(1, n + 1)}
    tc0 = {i: Topology.tc_stats(i) for i in workers}
    cpu0 = {i: procstat.tree_cpu_seconds(w.pid) for i, w in workers.items()}
    tcp0 = {i: tcp_counters(w.pid) for i, w in workers.items()}
    assert cluster.client is not None
    client_cpu0 = procstat.tree_cpu_seconds(cluster.client.pid)
    offsets = {i: w.log_path.stat().st_size for i, w in workers.items()}
    assert cluster.s3 is not None and cluster.redis is not None
    s3_cpu0, redis_cpu0 = procstat.tree_cpu_seconds(cluster.s3.pid), procstat.tree_cpu_seconds(cluster.redis.pid)
    m0, cores = _machine_cpu()
    s3_log0 = cluster.s3.log_path.stat().st_size
    answer = cluster.request(
        {"op": "upload", "path": str(path), "bucket": BUCKET, "key": f"scaling/n{n}-r{repeat}",
         "part_size": part_size, "timeout": timeout, "sha256": sha256},
        timeout=timeout + 60,
    )
    m1, _ = _machine_cpu()
    with open(cluster.s3.log_path, "rb") as f:
        f.seek(s3_log0)
        # A part request whose connection closed before its body was complete (botocore then
        # sends the whole part again on a new connection): SeaweedFS logs each one.
        sample["part_attempts_cut_off"] = f.read().decode(errors="replace").count("PutObjectPart: putToFiler failed")
    sample["s3_server_cpu_s"] = rnd(procstat.tree_cpu_seconds(cluster.s3.pid) - s3_cpu0, 2)
    sample["redis_cpu_s"] = rnd(procstat.tree_cpu_seconds(cluster.redis.pid) - redis_cpu0, 2)
    sample["client_cpu_s"] = rnd(procstat.tree_cpu_seconds(cluster.client.pid) - client_cpu0, 2)
    delta = [b - a for a, b in zip(m0, m1, strict=True)]
    total = sum(delta[:8]) or 1  # user nice system idle iowait irq softirq steal
    elapsed_cpu_s = total / procstat.CLK_TCK  # core-seconds that passed (all cores)
    sample["machine_cpu_busy"] = rnd(1 - (delta[3] + delta[4]) / total, 3)  # of all cores
    sample["machine_cpu_softirq"] = rnd(delta[6] / total, 3)
    sample["machine_cores"] = cores
    per_host = []
    for i, w in workers.items():
        tc1 = Topology.tc_stats(i)
        tcp1 = tcp_counters(w.pid)
        with open(w.log_path, "rb") as f:
            f.seek(offsets[i])
            text = f.read().decode(errors="replace")
        info = parse_worker_log(text)
        per_host.append({
            "host": i,
            "tc_bytes": tc1.get("bytes", 0) - tc0[i].get("bytes", 0) if tc1 and tc0[i] else None,
            "tc_dropped": tc1.get("dropped", 0) - tc0[i].get("dropped", 0) if tc1 and tc0[i] else None,
            "worker_cpu_s": rnd(procstat.tree_cpu_seconds(w.pid) - cpu0[i], 2),
            "tcp_out_segs": tcp1.get("out_segs", 0) - tcp0[i].get("out_segs", 0) if tcp1 and tcp0[i] else None,
            "tcp_retrans_segs": tcp1.get("retrans_segs", 0) - tcp0[i].get("retrans_segs", 0) if tcp1 and tcp0[i] else None,
            **info,
        })
    sample["per_host"] = per_host
    # This scenario's own processes against the whole machine (others share it).
    ours = sample["s3_server_cpu_s"] + sample["redis_cpu_s"] + sample["client_cpu_s"] + sum(h["worker_cpu_s"] for h in per_host)
    sample["bench_cpu_s"] = rnd(ours, 2)
    sample["bench_cpu_share"] = rnd(ours / elapsed_cpu_s, 3) if elapsed_cpu_s else None
    for key in ("wall_s", "waited_s", "state", "verified", "part_count", "bytes_sent", "stored_size", "sha256_ok",
                "sha256_s", "error"):
        if key in answer:
            sample[key] = rnd(answer[key]) if isinstance(answer[key], float) else answer[key]
    if not answer.get("ok"):
        sample["error"] = answer.get("error", "failed")
        return sample
    sample["ok"] = True
    sample["mib_s"] = rnd(size / MiB / answer["wall_s"], 2)
    submitted, finished = answer["submitted_epoch"], answer.get("finished_epoch")
    firsts = [h["first_received"] for h in per_host if h["first_received"]]
    lasts = [h["last_done"] for h in per_host if h["last_done"]]
    if firsts and lasts:
        # Where the wall time went: submit -> first part taken, parts moving, last part -> completed;
        # and how long hosts sat idle at the end while another was still sending (imbalance).
        sample["startup_s"] = rnd(min(firsts) - submitted, 2)
        sample["transfer_s"] = rnd(max(lasts) - min(firsts), 2)
        if finished:
            sample["completion_s"] = rnd(max(0.0, finished - max(lasts)), 2)  # log stamps lag by ms
        sample["idle_at_end_s"] = rnd(median(max(lasts) - h["last_done"] for h in per_host if h["last_done"]), 2)
        sample["max_idle_at_end_s"] = rnd(max(max(lasts) - h["last_done"] for h in per_host if h["last_done"]), 2)
    for h in per_host:
        h.pop("first_received")
        h.pop("last_done")
    return sample


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def run(rig: Rig, *, size: int, repeats: int, hosts: list[int], part_size: int, concurrency: int, rate: int,
        timeout: float, log: Any, burst: int = 256 * 1024, latency_ms: int = 100, tcp_cc: str | None = None) -> dict[str, Any]:
    """``tcp_cc``: TCP congestion control to set inside the host namespaces (default: what they
    inherit from the machine)."""
    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "file_size": size, "part_size": part_size, "part_count": -(-size // part_size),
        "concurrency_per_host": concurrency, "hosts": hosts, "repeats": repeats,
        "rate_per_host": rate, "tbf": {"rate_bytes_per_s": rate, "burst_bytes": burst, "latency_ms": latency_ms},
        "target": {"hosts": TARGET_HOSTS, "ratio": TARGET_RATIO},
    }
    reason = unavailable()
    if reason:
        log(f"  skipped: {reason}")
        return {**result, "status": "skipped", "reason": reason}
    remove_namespaces(log)
    topo = Topology(max(hosts), rate, burst, latency_ms)
    cluster = Cluster(rig, concurrency=concurrency, log=log)
    path = None
    try:
        try:
            topo.up()
            if tcp_cc:  # per route: the namespace's sysctl may be read-only in a container
                for i in range(1, max(hosts) + 1):
                    _cmd("ip", "-n", host_ns(i), "route", "replace", f"{SUBNET}.0/24", "dev", "eth0", "proto", "kernel",
                         "scope", "link", "src", f"{SUBNET}.{10 + i}", "congctl", tcp_cc)
        except (SetupError, OSError, subprocess.SubprocessError) as exc:
            log(f"  skipped: could not build the network namespaces: {exc}")
            return {**result, "status": "skipped", "reason": f"could not build the network namespaces: {exc}"}
        result["tcp_congestion_control"] = tcp_cc or _cmd(
            "ip", "netns", "exec", host_ns(1), "sysctl", "-n", "net.ipv4.tcp_congestion_control", check=False).strip()
        cluster.start_servers()
        log(f"  namespaces up: server {SERVER_IP}, {max(hosts)} hosts capped at {rate / MiB:g} MiB/s each (tbf); "
            f"writing a {size / MiB:.0f} MiB random file")
        path = rig.make_random_file("scaling.bin", size)
        digest = _sha256(path)
        samples: list[dict[str, Any]] = []
        order: list[list[int]] = []
        for repeat in range(repeats):
            sequence = list(hosts) if repeat % 2 == 0 else list(reversed(hosts))
            order.append(sequence)
            for n in sequence:
                started = cluster.ensure_workers(n)
                time.sleep(0.5)  # let the new workers' first polls settle
                try:
                    sample = measure(cluster, n, repeat, path, digest, part_size, timeout, size)
                except Exception as exc:
                    sample = {"hosts": n, "repeat": repeat, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
                    log(traceback.format_exc(limit=5))
                sample["workers_start_s"] = rnd(started, 2)
                samples.append(sample)
                if sample["ok"]:
                    parts = "/".join(str(h["parts"]) for h in sample["per_host"])
                    mib = "/".join(f"{(h['tc_bytes'] or 0) / MiB:.0f}" for h in sample["per_host"])
                    rtx = "/".join(str(h["tcp_retrans_segs"]) for h in sample["per_host"])
                    log(f"  {n} host(s) #{repeat + 1}: {sample['mib_s']:6.1f} MiB/s  wall {sample['wall_s']:6.2f} s  "
                        f"parts {parts}  MiB sent {mib}  cut off {sample['part_attempts_cut_off']}  TCP retransmits {rtx}  startup {sample.get('startup_s')} s  "
                        f"tail {sample.get('completion_s')} s  idle-at-end max {sample.get('max_idle_at_end_s')} s  "
                        f"S3 CPU {sample['s3_server_cpu_s']} s  CPU busy: machine {sample['machine_cpu_busy'] * 100:.0f}%, "
                        f"this scenario {sample['bench_cpu_share'] * 100:.0f}%")
                else:
                    log(f"  {n} host(s) #{repeat + 1}: FAILED {sample.get('error', '')[:300]}")
        result.update(status="ran", order=order, samples=samples)
        result["summary"] = summarize(samples, hosts, size)
        ref = result["summary"].get(str(TARGET_HOSTS), {}).get("ratio_vs_1")
        best = {n: max((s["mib_s"] for s in samples if s["ok"] and s["hosts"] == n), default=None) for n in hosts}
        if best.get(TARGET_HOSTS) and best.get(min(hosts)):
            result["best_ratio"] = rnd(best[TARGET_HOSTS] / best[min(hosts)], 2)
        result["target"].update(measured=ref, met=None if ref is None else ref >= TARGET_RATIO)
    finally:
        cluster.stop()
        topo.down()
        if path is not None:
            path.unlink(missing_ok=True)
        result["duration_s"] = rnd(time.perf_counter() - t_start, 1)
    if any(not s["ok"] for s in result.get("samples", [])):
        result["error"] = "; ".join(sorted({s.get("error", "failed") for s in result["samples"] if not s["ok"]}))[:3000]
    return result


def summarize(samples: list[dict[str, Any]], hosts: list[int], size: int) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for n in hosts:
        runs = [s for s in samples if s["hosts"] == n]
        good = [s for s in runs if s["ok"]]
        row: dict[str, Any] = {"runs": len(runs), "ok_runs": len(good)}
        if not good:
            row["error"] = runs[-1].get("error", "failed") if runs else "not run"
            out[str(n)] = row
            continue
        rates = [s["mib_s"] for s in good]
        row.update(
            mib_s=rnd(median(rates), 2), mib_s_min=min(rates), mib_s_max=max(rates),
            wall_s=rnd(median(s["wall_s"] for s in good), 2),
            startup_s=rnd(median(s.get("startup_s") for s in good), 2),
            transfer_s=rnd(median(s.get("transfer_s") for s in good), 2),
            completion_s=rnd(median(s.get("completion_s") for s in good), 2),
            max_idle_at_end_s=rnd(median(s.get("max_idle_at_end_s") for s in good), 2),
            s3_server_cpu_s=rnd(median(s["s3_server_cpu_s"] for s in good), 2),
            worker_cpu_s=rnd(median(sum(h["worker_cpu_s"] for h in s["per_host"]) for s in good), 2),
            machine_cpu_busy=rnd(median(s["machine_cpu_busy"] for s in good), 3),
            bench_cpu_share=rnd(median(s["bench_cpu_share"] for s in good), 3),
            tcp_retrans_share=rnd(median(
                sum(h["tcp_retrans_segs"] or 0 for h in s["per_host"]) / max(1, sum(h["tcp_out_segs"] or 0 for h in s["per_host"]))
                for s in good), 4),
            part_attempts_cut_off=[s.get("part_attempts_cut_off", 0) for s in good],
            tc_overhead=rnd(median(sum(h["tc_bytes"] or 0 for h in s["per_host"]) / size for s in good), 3),
            parts_per_host=["/".join(str(h["parts"]) for h in s["per_host"]) for s in good],
            tc_mib_per_host=[
                "/".join(f"{(h['tc_bytes'] or 0) / MiB:.1f}" for h in s["per_host"]) for s in good
            ],
        )
        out[str(n)] = row
    # Ratios against the smallest N (1 host unless --scaling-hosts says otherwise).
    lowest = min(hosts)
    base = out.get(str(lowest), {}).get("mib_s")
    for n in hosts:
        row = out[str(n)]
        if base and row.get("mib_s"):
            row["ratio_vs_1"] = rnd(row["mib_s"] / base, 2)
            row["efficiency"] = rnd(row["mib_s"] / base / (n / lowest), 3)
            row["mib_s_per_host"] = rnd(row["mib_s"] / n, 2)
    return out
