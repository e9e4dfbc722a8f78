"""A run directory: one owner, atomic files, damaged files refused or repaired, write failures
reported at once with everything before them intact and resumable."""

import errno
import json
import os
import re
import socket
import subprocess
import sys

import pytest

from cifar_jax import train, workdir as workdir_lib
from cifar_jax.checkpointing import Checkpoints
from cifar_jax.workdir import RunLock, WorkdirError
from conftest import CACHE_FLAG

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_lock_has_one_owner_and_names_it(tmp_path):
    first = RunLock(str(tmp_path)).acquire()
    info = json.load(open(tmp_path / "run.lock"))
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    with pytest.raises(WorkdirError, match=rf"is in use by process {os.getpid()} on host"):
        RunLock(str(tmp_path)).acquire()
    first.release()
    assert not (tmp_path / "run.lock").exists()
    RunLock(str(tmp_path)).acquire().release()  # free again


def test_lock_left_by_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / "run.lock").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": int(dead), "started": "earlier"}))
    lock = RunLock(str(tmp_path)).acquire()
    assert f"Taking over {tmp_path}/run.lock from process {dead}" in caplog.text
    assert "no longer running" in caplog.text
    lock.release()
    # A lock file from another host cannot be proven stale: refused, with the way out.
    (tmp_path / "run.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(WorkdirError, match="host elsewhere.*delete .*run.lock"):
        RunLock(str(tmp_path)).acquire()


def test_one_live_owner_whatever_happens_to_the_lock_file(tmp_path, caplog):
    """The holder's directory lock keeps a second process out after its lock file was deleted
    or replaced by a directory; the holder then releases with a warning, never an OS error;
    a lock path that is a directory at start is refused in one line."""
    first = RunLock(str(tmp_path)).acquire()
    (tmp_path / "run.lock").unlink()
    with pytest.raises(WorkdirError, match="is in use by another process"):
        RunLock(str(tmp_path)).acquire()
    (tmp_path / "run.lock").mkdir()
    with pytest.raises(WorkdirError, match="is in use by another process"):
        RunLock(str(tmp_path)).acquire()
    first.release()  # no error, at most a warning
    assert "no longer the lock file this run created" in caplog.text
    with pytest.raises(WorkdirError, match="run.lock is a directory; a lock file must be a "
                                           "plain file"):  # at start
        RunLock(str(tmp_path)).acquire()
    (tmp_path / "run.lock").rmdir()
    RunLock(str(tmp_path)).acquire().release()


@pytest.mark.parametrize("code,reason,advice", [
    (errno.ENOSPC, r"No space left on device \(/w/x; 1\.0 MB free, 2\.0 MB needed\)",
     "free space there"),
    (errno.EROFS, r"Read-only file system \(/w/x\)", "remount the file system read-write"),
    (errno.EACCES, r"Permission denied \(/w/x\)", "make it writable for this user"),
    (errno.ENAMETOOLONG, r"File name too long \(/w/x\)", "use a shorter --workdir"),
])
def test_write_errors_name_the_os_error_with_advice_that_fits(monkeypatch, code, reason,
                                                              advice):
    """Whatever the cause, and whether an OSError or tensorstore's text carries it."""
    monkeypatch.setattr(workdir_lib.shutil, "disk_usage",
                        lambda d: os.statvfs_result  # noqa: E731
                        and type("U", (), {"free": 1 << 20})())
    errors = [OSError(code, os.strerror(code), "/w/x"),
              ValueError(f'RESOURCE_EXHAUSTED: Error writing "a/0" in OCDBT database at local '
                         f'file "/w/ocdbt/": Failed writing: "/w/x": {os.strerror(code)} '
                         f"[os_error_code='{code}']")]
    for error in errors:
        message = str(workdir_lib.write_error("/w", error, 2 << 20, "save a checkpoint"))
        assert re.fullmatch(rf"Cannot save a checkpoint in /w: {reason}\. Everything written "
                            rf"before is intact: {advice}.*, then run the same command again "
                            r"\(a run resumes where it stopped\)\.", message), message


def test_second_process_on_a_busy_run_workdir_exits_2(tmp_path):
    with RunLock(str(tmp_path)):
        proc = subprocess.run(
            [sys.executable, "-m", "cifar_jax.main", "--config", "configs/smoke.py",
             "--workdir", str(tmp_path), CACHE_FLAG], cwd=ROOT, capture_output=True, text=True,
            timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count(f"is in use by process {os.getpid()}") == 1  # printed once
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "config.json").exists()


def test_atomic_json_and_partial_jsonl_line(tmp_path, caplog):
    path = str(tmp_path / "r.json")
    workdir_lib.write_json_atomic(path, {"a": 1})
    assert workdir_lib.read_json(path) == {"a": 1}
    assert os.listdir(tmp_path) == ["r.json"]  # no temporary file left
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask  # like any other file, not 0600
    (tmp_path / "bad.json").write_text('{"status": "comp')
    with pytest.raises(WorkdirError, match=r"bad.json is not valid JSON.*move it away"):
        workdir_lib.read_json(str(tmp_path / "bad.json"))
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"epoch": 1, "step": 8}\n{"epoch": 2, "st')  # a crash mid-append
    assert workdir_lib.read_jsonl(str(metrics)) == [{"epoch": 1, "step": 8}]
    assert metrics.read_text().endswith('"st')  # readers (the report) never write
    assert workdir_lib.read_jsonl(str(metrics), repair=True) == [{"epoch": 1, "step": 8}]
    assert "dropping an incomplete last line" in caplog.text
    assert metrics.read_text() == '{"epoch": 1, "step": 8}\n'  # repaired by the lock holder
    metrics.write_text('{"epoch": 1, "st\n{"epoch": 2, "step": 16}\n')
    with pytest.raises(WorkdirError, match="metrics.jsonl, line 1, is not valid JSON"):
        workdir_lib.read_jsonl(str(metrics))


@pytest.mark.parametrize("damage,message", [
    ("result.json", r"result.json is not valid JSON"),
    ("config.json", r"config.json is not valid JSON"),
    ("result-kind", r"result.json holds str JSON where an object belongs"),
    ("metrics-kind", r"metrics.jsonl, line 1, is not a per-epoch record"),
    ("checkpoints-file", r"checkpoints is a file, where the checkpoint directory belongs"),
    ("foreign", r"checkpoints holds entries that are not checkpoints: notes.txt"),
])
def test_damaged_workdir_is_refused_at_start_up(tiny_config, tmp_path, damage, message):
    if damage == "checkpoints-file":
        (tmp_path / "checkpoints").write_text("x")
    elif damage == "foreign":
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "checkpoints" / "notes.txt").write_text("x")
    elif damage == "result-kind":
        (tmp_path / "result.json").write_text('"done"')
    elif damage == "metrics-kind":
        (tmp_path / "metrics.jsonl").write_text('{"epoch": 9, "step": "x"}\n')
    else:
        (tmp_path / damage).write_text("{not json")
    with pytest.raises(WorkdirError, match=message):
        train.train_and_evaluate(tiny_config, str(tmp_path))
    if damage == "metrics-kind":  # left as it was, for the user to look at
        assert (tmp_path / "metrics.jsonl").read_text() == '{"epoch": 9, "step": "x"}\n'
    else:
        assert not (tmp_path / "metrics.jsonl").exists()  # refused before training began


class _FailedWrite:
    """A save's commit that ran out of space half-way: part of the data is written (the real
    writes finish), then the write fails."""

    def __init__(self, writes):
        self.writes = list(writes or [])

    def result(self, timeout=None):
        for write in self.writes:
            write.result(timeout)
        raise OSError(errno.ENOSPC, "No space left on device")


def _fail_writes_from(monkeypatch, first_failing_save: int):
    from orbax.checkpoint._src.handlers import standard_checkpoint_handler as handler

    real = handler.StandardCheckpointHandler.async_save
    saves = []

    async def async_save(self, directory, *args, **kwargs):
        futures = await real(self, directory, *args, **kwargs)
        saves.append(str(directory))
        if len(saves) >= first_failing_save:
            return [_FailedWrite(futures)]
        return futures

    monkeypatch.setattr(handler.StandardCheckpointHandler, "async_save", async_save)


def test_disk_full_mid_save_keeps_latest_and_best_and_resumes(tiny_config, tmp_path,
                                                              monkeypatch):
    """The epoch-2 save fails half-way (ENOSPC): the run stops with the workdir, free space and
    size in one message; epoch 1's checkpoint (latest and best) stays; a rerun completes."""
    reference = train.train_and_evaluate(tiny_config, str(tmp_path / "reference"))
    workdir = str(tmp_path / "run")
    _fail_writes_from(monkeypatch, first_failing_save=2)
    with pytest.raises(WorkdirError, match=rf"Cannot save a checkpoint in {workdir}/checkpoints: "
                                           r".*No space left on device \(.* free, .* needed\)"):
        train.train_and_evaluate(tiny_config, workdir)
    monkeypatch.undo()
    ckpts = Checkpoints(workdir)
    assert ckpts.latest_step() == 8 and ckpts.best_step() == 8
    ckpts.close()
    assert not os.path.exists(os.path.join(workdir, "result.json"))
    resumed = train.train_and_evaluate(tiny_config, workdir)
    assert resumed["test_loss"] == reference["test_loss"]
    records = workdir_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["epoch"] for r in records] == [1, 2]  # no epoch lost, none twice


@pytest.mark.parametrize("failure", ["read-only", "no-space"])
def test_unwritable_workdir_mid_run_stops_at_once(tiny_config, tmp_path, monkeypatch, failure):
    workdir = str(tmp_path)
    probes = []
    real_probe = workdir_lib.tempfile.NamedTemporaryFile
    real_usage = workdir_lib.shutil.disk_usage

    def probe(*args, **kwargs):
        probes.append(1)
        if failure == "read-only" and len(probes) > 3:  # 2 start-up probes, epoch 1's save
            raise OSError(errno.EROFS, "Read-only file system")
        return real_probe(*args, **kwargs)

    def usage(path):
        u = real_usage(path)
        return u._replace(free=1000) if failure == "no-space" and len(probes) > 3 else u

    monkeypatch.setattr(workdir_lib.tempfile, "NamedTemporaryFile", probe)
    monkeypatch.setattr(workdir_lib.shutil, "disk_usage", usage)
    # The OS error as it is, with advice that fits it (free space only where space is short).
    reason = (r"Read-only file system\. .*: remount the file system read-write"
              if failure == "read-only" else
              r"not enough free space \(.* free, .* needed\)\. .*: free space there")
    with pytest.raises(WorkdirError, match=rf"Cannot save a checkpoint in {workdir}/checkpoints:"
                                           rf" {reason}.*, then run the same command"):
        train.train_and_evaluate(tiny_config, workdir)
    # Epoch 1's checkpoint is intact; epoch 2's save never started (nothing half-written).
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["8"]


def test_crash_between_metrics_and_first_checkpoint_leaves_no_duplicate(tiny_config, tmp_path,
                                                                        monkeypatch):
    """Epoch 1's record is appended, then the process dies before its checkpoint exists: the
    rerun starts from scratch and must not keep that record beside the new one."""
    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(Checkpoints, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(tiny_config, str(tmp_path))
    monkeypatch.undo()
    assert len(workdir_lib.read_jsonl(str(tmp_path / "metrics.jsonl"))) == 1
    train.train_and_evaluate(tiny_config, str(tmp_path))
    records = workdir_lib.read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [r["epoch"] for r in records] == [1, 2]


def test_failed_writes_name_the_directory_and_the_free_space(tmp_path, monkeypatch):
    def disk_full(fd):
        raise OSError(28, "No space left on device")

    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "step": 8}\n')
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(workdir_lib.WriteError, match=r"Cannot append to metrics.jsonl in "
                       r".*: No space left on device \(.* free, .* needed\)\. Everything"):
        workdir_lib.append_jsonl(str(tmp_path / "metrics.jsonl"), {"epoch": 2, "step": 16})
    with pytest.raises(workdir_lib.WriteError, match=r"Cannot write result.json in "):
        workdir_lib.write_json_atomic(str(tmp_path / "result.json"), {"status": "completed"})
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]  # no temporary file left
    # What was appended before the failure is read back; a partial line would be dropped.
    assert workdir_lib.read_jsonl(str(tmp_path / "metrics.jsonl"), repair=True)[0]["epoch"] == 1


def test_a_run_that_saved_nothing_takes_any_new_config(tiny_config, tmp_path, caplog):
    """A crash before the first checkpoint (out of memory, say) must not block the rerun with
    a smaller batch: nothing trained is saved, so the run starts afresh."""
    workdir_lib.store_config(tiny_config, str(tmp_path))
    changed = tiny_config.copy_and_resolve_references()
    changed.batch_size = 16
    assert workdir_lib.check_stored_config(changed, str(tmp_path)) == [
        "batch_size: stored 32, now 16"]
    assert "holds no checkpoint yet: the run starts afresh" in caplog.text
    (tmp_path / "checkpoints" / "8").mkdir(parents=True)  # once a checkpoint exists: refused
    with pytest.raises(Exception, match="do not fit this config"):
        workdir_lib.check_stored_config(changed, str(tmp_path))


def test_a_lock_file_that_is_a_link_is_refused_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "run").mkdir()
    os.symlink(victim, tmp_path / "run" / "run.lock")
    with pytest.raises(WorkdirError, match="run.lock is a symbolic link"):
        RunLock(str(tmp_path / "run")).acquire()
    assert victim.read_text() == "precious"
