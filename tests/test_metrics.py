"""A worker's Prometheus metrics (``UPLOADER_METRICS_PORT``, uploader/metrics.py), scraped from
real workers during and after real uploads and checked against what happened; and clients that
no longer appear in Flower as workers of their own."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import promql_parser
import pytest
import yaml
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Stack, listen_for_events
from uploader.dev.localstack import free_port, wait_until
from uploader.metrics import FLEET_FAMILIES
from uploader.planner import MiB

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> tuple[str, Samples]:
    """The metrics text and its samples by ``(name, sorted labels)``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_scraped_worker_counts_what_it_did(make_stack, pool: str) -> None:  # type: ignore[no-untyped-def]
    """Parts and bytes of a multipart upload, a small object, a cancelled upload, the part and
    completion histograms, in-flight parts while sending and none after, the fleet's figures
    (live workers, queues, the recovery run), and never an upload id in a label. Under the
    prefork pool, the pool processes' figures add up in the one scrape of the main process."""
    stack: Stack = make_stack(UPLOADER_RECONCILE_INTERVAL="1")
    port = free_port()
    stack.start_worker(f"metrics-{pool}", concurrency=2, pool=pool, UPLOADER_METRICS_PORT=str(port),
                       UPLOADER_MAX_BANDWIDTH=str(8 * MiB))
    bucket = stack.new_bucket()
    parts, part_size = 6, 5 * MiB
    path = stack.make_file(parts * part_size)
    started = time.monotonic()
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/big.bin", part_size=part_size)
    seen_in_flight: list[float] = []

    def sending_parts() -> bool:
        seen_in_flight.append(value(scrape(port)[1], "uploader_parts_in_flight"))
        return seen_in_flight[-1] >= 1

    wait_until(sending_parts, 60, "a part in flight on the scraped worker")
    handle.wait(timeout=120)
    elapsed = time.monotonic() - started
    small = stack.make_file(1000)
    stack.uploader.submit(str(small), f"s3://{bucket}/small.bin").wait(timeout=60)

    def recovery_ran() -> bool:
        samples = scrape(port)[1]
        return value(samples, "uploader_recovery_runs_total") >= 1 and (
            "uploader_recovery_last_run_timestamp_seconds", ()) in samples

    wait_until(recovery_ran, 30, "a recovery run counted")
    text, samples = scrape(port)
    assert value(samples, "uploader_uploads_started_total", mode="multipart") == 1
    assert value(samples, "uploader_uploads_started_total", mode="single") == 1
    assert value(samples, "uploader_uploads_finished_total", outcome="completed") == 2
    assert value(samples, "uploader_parts_uploaded_total", kind="part") == parts
    assert value(samples, "uploader_bytes_uploaded_total", kind="part") == parts * part_size
    assert value(samples, "uploader_parts_uploaded_total", kind="object") == 1
    assert value(samples, "uploader_bytes_uploaded_total", kind="object") == 1000
    assert value(samples, "uploader_part_duration_seconds_count") == parts
    assert value(samples, "uploader_object_duration_seconds_count") == 1
    assert value(samples, "uploader_completion_duration_seconds_count") == 1
    # Parts were being timed, and only while they were sent (two at a time, within the upload).
    assert 0 < value(samples, "uploader_part_duration_seconds_sum") <= 2 * elapsed + 1
    assert value(samples, "uploader_parts_in_flight") == 0
    assert value(samples, "uploader_fleet_figures_up") == 1
    assert value(samples, "uploader_workers_alive") == 1
    assert ("uploader_messages_queued", (("queue", "uploader.parts"),)) in samples
    assert ("uploader_messages_queued", (("queue", "uploader.control"),)) in samples
    assert ("uploader_parts_queued", ()) in samples
    assert handle.upload_id not in text and bucket not in text  # labels stay low-cardinality

    cancelled = stack.uploader.submit(str(path), f"s3://{bucket}/cancelled.bin", part_size=part_size)
    stack.wait_parts_done(cancelled.upload_id, 1)
    stack.uploader.cancel(cancelled.upload_id)
    wait_until(lambda: value(scrape(port)[1], "uploader_uploads_finished_total", outcome="cancelled") == 1, 30,
               "the cancel counted")
    wait_until(lambda: value(scrape(port)[1], "uploader_parts_in_flight") == 0, 60, "no part in flight after the cancel")


def test_uploads_by_state_and_stalled_come_from_the_recovery_run(make_stack) -> None:  # type: ignore[no-untyped-def]
    """An upload left ``uploading`` by a killed worker shows as active, then stalled, in any
    live worker's figures (counted by the recovery leader, read from Redis at the scrape)."""
    stack: Stack = make_stack(UPLOADER_RECONCILE_INTERVAL="1", UPLOADER_STALL_SECONDS="2")
    bucket = stack.new_bucket()
    path = stack.make_file(8 * 5 * MiB)
    handle = stack.upload_then_crash(path, f"s3://{bucket}/stalled.bin", parts_before=1, part_size=5 * MiB)
    port = free_port()
    # A worker that reads no part lane: it leads recovery and serves metrics, and sends nothing.
    stack.start_worker("observer", queues="uploader.control", UPLOADER_METRICS_PORT=str(port),
                       UPLOADER_AUTO_RESUME_LIMIT="0")

    def counted() -> bool:
        samples = scrape(port)[1]
        return value(samples, "uploader_uploads_active", state="uploading") >= 1 and value(
            samples, "uploader_uploads_stalled") >= 1

    wait_until(counted, 60, "the stalled upload in the fleet's figures")
    assert handle.upload_id not in scrape(port)[0]


def test_clients_send_no_task_sent_events(make_stack) -> None:  # type: ignore[no-untyped-def]
    """Flower names a worker for every process that sends events: a client's submissions must not
    add one (``gen<pid>@host`` per CLI call); the worker still reports receiving them."""
    stack: Stack = make_stack()
    stack.start_worker("events", concurrency=2)
    events: list[dict] = []
    thread = listen_for_events(Celery(broker=stack.redis_url), events)
    bucket = stack.new_bucket()
    handle = stack.uploader.submit(str(stack.make_file(1000)), f"s3://{bucket}/a.bin")
    handle.wait(timeout=60)
    wait_until(lambda: any(e.get("type") == "task-succeeded" for e in events), 30, "the worker's events")
    workers = {e["hostname"] for e in events if e.get("type") == "task-received"}
    assert len(workers) == 1, workers
    assert {e.get("hostname") for e in events} == workers
    assert not [e for e in events if e.get("type") == "task-sent" and e.get("hostname") not in workers]
    thread.join(1)


ROOT = Path(__file__).resolve().parent.parent
#: The suffixes Prometheus samples add to a family's name.
SUFFIXES = ("", "_total", "_bucket", "_sum", "_count", "_created")


def exported_families() -> set[str]:
    """Every family a worker can export: its instruments (made in a fresh process, as a worker
    makes them) and the fleet's figures."""
    script = (
        "from prometheus_client import REGISTRY\n"
        "from uploader import metrics\n"
        "metrics._Instruments()\n"
        "print('\\n'.join(f.name for f in REGISTRY.collect()))\n"
    )
    names = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    return {n for n in names if n.startswith("uploader_")} | {f"uploader_{n}" for n in FLEET_FAMILIES}


def named_metrics(expr: str) -> set[str]:
    return set(re.findall(r"\buploader_[a-z0-9_]+", expr))


def check_names(where: str, expr: str, families: set[str]) -> None:
    promql_parser.parse(expr.replace("$__rate_interval", "5m"))  # raises on a syntax error
    for name in named_metrics(expr):
        assert any(name == f + suffix for f in families for suffix in SUFFIXES), f"{where}: {name} is not exported"


def test_alert_rules_parse_and_name_only_exported_metrics() -> None:
    families = exported_families()
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yaml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert {r["alert"] for r in alerts} >= {
        "UploaderNoLiveWorkers", "UploaderUploadsStalled", "UploaderFailureRateHigh", "UploaderRecoveryNotRunning",
        "UploaderQueueGrowing",
    }
    for rule in alerts:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        check_names(rule["alert"], rule["expr"], families)
        assert named_metrics(rule["expr"]), f"{rule['alert']} names no metric of ours"


def test_grafana_dashboard_is_valid_and_names_only_exported_metrics() -> None:
    families = exported_families()
    dashboard = json.loads((ROOT / "deploy/grafana/uploader-dashboard.json").read_text())
    panels = dashboard["panels"]
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & mine, f"panel {panel['title']} overlaps another"
        cells |= mine
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            check_names(panel["title"], target["expr"], families)
    shown = set().union(*(named_metrics(t["expr"]) for p in panels for t in p["targets"]))
    # Every fleet figure and every instrument shows somewhere (by family).
    for family in families - {"uploader_fleet_figures_up", "uploader_messages_unacked",
                              "uploader_janitor_last_run_timestamp_seconds"}:
        assert any(name in (family + s for s in SUFFIXES) for name in shown), f"{family} is on no panel"


def test_every_scraped_family_is_a_known_one(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack()
    port = free_port()
    stack.start_worker("families", concurrency=2, UPLOADER_METRICS_PORT=str(port))
    bucket = stack.new_bucket()
    stack.uploader.submit(str(stack.make_file(1000)), f"s3://{bucket}/a.bin").wait(timeout=60)
    text, _ = scrape(port)
    scraped = {f.name for f in text_string_to_metric_families(text)}
    assert scraped <= exported_families() and "uploader_uploads_finished" in scraped
