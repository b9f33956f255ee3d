"""The audit trail under failure: disk full (/dev/full, a real ENOSPC), logrotate + reopen, a full backlog,
and the flush at close/shutdown. Unit level on real files in tmp_path; no engines, ~2s in all."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.observability import lines as lines_module
from gateway.observability.audit import AuditRecord, AuditTrail
from gateway.observability.lines import FileTarget
from gateway.observability.metrics import Metrics

DEV_FULL = Path("/dev/full")
needs_dev_full = pytest.mark.skipif(not DEV_FULL.exists(), reason="no /dev/full on this system")


def record(n: int) -> AuditRecord:
    return AuditRecord(request_id=f"req-{n}", tenant="prod-app", key_id="0123abcd", model_requested="llama-2-7b",
                       model_served="llama-2-7b", license="llama2", decision="allow", rule="license-ok")


def request_ids(path: Path) -> list[str]:
    return [json.loads(line)["request_id"] for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def sample(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name)


@pytest.fixture
def audit_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="gateway.audit")
    return caplog


def audit_messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gateway.audit" and r.levelno == level]


def test_metrics_exist_before_any_audit_trail() -> None:
    metrics = Metrics()
    assert sample(metrics, "gateway_audit_write_errors_total") == 0
    assert sample(metrics, "gateway_audit_records_dropped_total") == 0
    assert sample(metrics, "gateway_audit_healthy") == 1
    assert b"gateway_audit_write_errors_total 0.0" in metrics.render()[0]


@needs_dev_full
def test_disk_full_is_counted_logged_once_and_nothing_is_lost_after_recovery(
        tmp_path: Path, audit_log: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "audit.jsonl"
    path.symlink_to(DEV_FULL)  # every write fails with ENOSPC, for real
    trail = AuditTrail(str(path))
    metrics = Metrics()
    metrics.watch_audit(trail)
    try:
        assert trail.healthy
        assert all(trail.record(record(n)) for n in range(3))
        wait_for(lambda: trail.write_errors >= 3)  # retried (backoff 50, 100, 200 ms...), not dropped
        assert not trail.healthy
        assert sample(metrics, "gateway_audit_healthy") == 0
        assert sample(metrics, "gateway_audit_write_errors_total") >= 3
        assert sample(metrics, "gateway_audit_records_dropped_total") == 0
        assert trail.pending == 3
        errors = audit_messages(audit_log, logging.ERROR)
        assert len(errors) == 1 and "No space left on device" in errors[0]  # once per streak, not per try
        assert not trail.wait_written(0.1)

        trail.record(record(3))  # accepted while failing: held too
        path.unlink()  # space again: the path is a real file from now on
        trail.reopen()
        assert trail.wait_written(5)
        assert trail.healthy and trail.pending == 0
        assert sample(metrics, "gateway_audit_healthy") == 1
        assert request_ids(path) == [f"req-{n}" for n in range(4)]  # each once, whole, in order
        assert len(audit_messages(audit_log, logging.WARNING)) == 1  # the recovery
    finally:
        trail.close()


class _FullDisk:
    """`os` for the sink's module, whose `write` stops after part of a batch and then fails with ENOSPC
    until `free()`: a disk that fills mid-line and frees again (logrotate compressed something)."""

    def __init__(self) -> None:
        self.full = False
        self.failures = 0
        self._freed = threading.Event()

    def __getattr__(self, name: str):
        return getattr(os, name)

    def fill(self) -> None:
        self.full = True

    def free(self) -> None:
        self.full = False

    def write(self, fd: int, data) -> int:
        if not self.full:
            return os.write(fd, data)
        if self.failures == 0:
            self.failures += 1
            return os.write(fd, bytes(data[:10]))  # a short write: 10 bytes of the first line made it
        self.failures += 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_write_failing_mid_line_resumes_in_place_without_torn_or_repeated_lines(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = _FullDisk()
    monkeypatch.setattr(lines_module, "os", disk)
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(str(path))
    try:
        trail.record(record(0))
        assert trail.wait_written(5)
        disk.fill()
        trail.record(record(1))
        trail.record(record(2))
        wait_for(lambda: disk.failures >= 3)
        assert not trail.healthy and trail.write_errors >= 2
        disk.free()
        assert trail.wait_written(5)  # no reopen: the retry itself succeeds
        assert trail.healthy and trail.write_errors == disk.failures - 1  # the short write was no error
        assert request_ids(path) == ["req-0", "req-1", "req-2"]
    finally:
        trail.close()


def test_logrotate_rename_then_reopen_loses_nothing(tmp_path: Path) -> None:
    path, rotated = tmp_path / "audit.jsonl", tmp_path / "audit.jsonl.1"
    trail = AuditTrail(str(path))
    try:
        for n in range(5):
            trail.record(record(n))
        assert trail.wait_written(5)
        path.rename(rotated)  # logrotate moves the file...
        for n in range(5, 8):
            trail.record(record(n))  # ...records before the SIGHUP still go to the moved file...
        trail.reopen()  # ...then postrotate sends SIGHUP
        for n in range(8, 12):
            trail.record(record(n))
        assert trail.wait_written(5)
        assert request_ids(rotated) == [f"req-{n}" for n in range(8)]
        assert request_ids(path) == [f"req-{n}" for n in range(8, 12)]
        assert trail.healthy and trail.write_errors == 0
    finally:
        trail.close()


def test_a_failed_reopen_keeps_the_old_file_is_counted_and_retried(
        tmp_path: Path, audit_log: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "audit.jsonl"
    trail = AuditTrail(str(path))
    try:
        trail.record(record(0))
        assert trail.wait_written(5)
        directory.rename(tmp_path / "moved")  # the path can't be opened any more
        trail.reopen()
        trail.record(record(1))
        assert trail.wait_written(5)
        assert not trail.healthy and trail.write_errors >= 1
        assert request_ids(tmp_path / "moved" / "audit.jsonl") == ["req-0", "req-1"]  # nothing lost
        directory.mkdir()
        trail.record(record(2))  # the reopen is tried again before this write, and succeeds
        assert trail.wait_written(5)
        assert trail.healthy
        assert request_ids(path) == ["req-2"]
        assert len(audit_messages(audit_log, logging.ERROR)) == 1
    finally:
        trail.close()


class _StuckDisk:
    """A LineTarget whose writes block until released: a disk that stopped answering."""

    description = "stuck disk"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lines: list[str] = []

    def write(self, batch: str, *, retry: bool) -> None:
        self.release.wait(10)
        self.lines.extend(batch.splitlines())

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_full_backlog_refuses_records_counts_them_and_turns_unhealthy(
        audit_log: pytest.LogCaptureFixture) -> None:
    disk = _StuckDisk()
    trail = AuditTrail(disk, max_pending=10)
    metrics = Metrics()
    metrics.watch_audit(trail)
    try:
        assert all(trail.record(record(n)) for n in range(10))  # without a loop each is handed over at once
        started = time.monotonic()
        assert not trail.record(record(10)) and not trail.record(record(11))
        assert time.monotonic() - started < 0.5  # refused at once: the event loop is never blocked
        assert trail.dropped == 2 and not trail.healthy
        assert sample(metrics, "gateway_audit_records_dropped_total") == 2
        assert sample(metrics, "gateway_audit_pending_records") == 10
        assert len(audit_messages(audit_log, logging.ERROR)) == 1  # once per saturation, not per record
        disk.release.set()
        assert trail.wait_written(5)
        assert trail.healthy and trail.pending == 0
        assert trail.record(record(12))
        assert trail.wait_written(5)
        assert disk.lines and [json.loads(line)["request_id"] for line in disk.lines] == (
            [f"req-{n}" for n in range(10)] + ["req-12"])
    finally:
        disk.release.set()
        trail.close()


def test_close_writes_out_records_still_waiting_for_the_batch_timer(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"

    async def serve() -> AuditTrail:
        trail = AuditTrail(str(path))
        for n in range(1000):
            trail.record(record(n))  # within a loop: batched, handed over by a timer 50 ms later
        await asyncio.to_thread(trail.close, 5)  # as the lifespan shutdown does, before the timer fires
        return trail

    trail = asyncio.run(serve())
    assert request_ids(path) == [f"req-{n}" for n in range(1000)]
    assert not trail.record(record(1000)) and trail.dropped == 1  # after close: refused, counted
    trail.close()  # idempotent


@needs_dev_full
def test_close_gives_up_on_a_failing_disk_after_its_timeout_and_counts_the_loss(
        tmp_path: Path, audit_log: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "audit.jsonl"
    path.symlink_to(DEV_FULL)
    trail = AuditTrail(str(path))
    for n in range(5):
        trail.record(record(n))
    started = time.monotonic()
    trail.close(0.3)
    assert time.monotonic() - started < 2
    assert trail.dropped == 5 and trail.pending == 0
    assert any("gave up on 5 lines" in m for m in audit_messages(audit_log, logging.ERROR))


def test_stdout_sink_reopen_is_a_no_op(capsys: pytest.CaptureFixture[str]) -> None:
    trail = AuditTrail("stdout")
    trail.record(record(0))
    trail.reopen()
    trail.record(record(1))
    assert trail.wait_written(5)
    trail.close()
    assert trail.healthy and trail.write_errors == 0
    assert [json.loads(line)["request_id"] for line in capsys.readouterr().out.splitlines()] == ["req-0", "req-1"]


def test_file_target_reopen_rewrites_a_torn_line_whole(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    target = FileTarget(str(path))
    target._data, target._done = b'{"a":1}\n{"b":2}\n', 11  # the failed write stopped inside line 2
    path.rename(tmp_path / "old")
    target.reopen()
    target.write("", retry=True)
    target.close()
    assert path.read_bytes() == b'{"b":2}\n'


def test_sighup_reopens_and_lifespan_shutdown_flushes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The app's wiring: SIGHUP reopens the audit file, the lifespan shutdown writes out every record."""
    from gateway.api.app import create_app
    from gateway.settings import Settings

    monkeypatch.setattr(lines_module, "FLUSH_INTERVAL_S", 3600)  # only a flush at shutdown can write the batch
    root = Path(__file__).resolve().parent.parent
    path, rotated = tmp_path / "audit.jsonl", tmp_path / "audit.jsonl.1"
    settings = Settings(registry=str(root / "model_registry.yaml"), tenants=None, audit_sink=str(path),
                        health_probe_interval_s=3600, redis_url=None, data_dir=tmp_path / "data")

    async def run() -> None:
        app = create_app(settings)
        inbox: asyncio.Queue = asyncio.Queue()
        outbox: asyncio.Queue = asyncio.Queue()
        lifespan = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                                           inbox.get, outbox.put))
        await inbox.put({"type": "lifespan.startup"})
        assert (await asyncio.wait_for(outbox.get(), 30))["type"] == "lifespan.startup.complete"
        state = app.app.app.state.gateway
        for n in range(100):
            state.audit.record(record(n))
        assert await asyncio.to_thread(state.audit.wait_written, 5)  # hands the batch over itself
        path.rename(rotated)
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(500):  # the reopen creates a new file at the path
            if path.exists():
                break
            await asyncio.sleep(0.01)
        for n in range(100, 300):
            state.audit.record(record(n))  # batched: still in memory when the shutdown starts
        await inbox.put({"type": "lifespan.shutdown"})
        assert (await asyncio.wait_for(outbox.get(), 30))["type"] == "lifespan.shutdown.complete"
        assert request_ids(path) == [f"req-{n}" for n in range(100, 300)]  # on disk when the shutdown ends
        assert not state.audit.record(record(300))  # closed
        await lifespan

    asyncio.run(run())
    assert request_ids(rotated) == [f"req-{n}" for n in range(100)]
    assert request_ids(path) == [f"req-{n}" for n in range(100, 300)]
