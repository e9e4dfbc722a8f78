"""What both frameworks share about a run directory: who owns it, what it holds, how it is written.

  run.lock        the process that owns the directory (host, pid, start time); see `RunLock`
  config.json     the run's config; a resume is compared against it (`check_stored_config`)
  metrics.jsonl   one JSON object per epoch, appended; a partial last line is dropped on read
  result.json     the run's outcome (`result_record`), written atomically

Every whole-file write goes to a temporary file in the same directory and is renamed into
place, so a reader (or a crash) never sees half a file. Files that cannot be read are refused
by name, before any training starts.
"""

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

from absl import logging

from cifar_jax import config_checks, models

CHECKPOINT_STEP = re.compile(r"^\d+$")  # a committed orbax step directory in checkpoints/


class WorkdirError(Exception):
    """A run directory cannot be used as it is; the message names the file and the fix."""


class WriteError(WorkdirError):
    """A write failed (no space, read-only, permission): what comes next would fail alike, so a
    grid stops rather than marking trial after trial failed."""


# ----------------------------------------------------------------------------------------------
# Atomic files.


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once, at import, before any threads
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def write_text_atomic(path: str, text: str) -> None:
    """Writes `text` to `path` via a uniquely named temporary file and a rename; WriteError
    (naming the directory and the free space) when that fails."""
    directory = os.path.dirname(os.path.abspath(path))
    what = f"write {os.path.basename(path)}"
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                                   suffix=".tmp")
    except OSError as e:
        raise write_error(directory, e, len(text), what) from e
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # as open() would create it (mkstemp: 0600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise write_error(directory, e, len(text), what) from e
        raise


def write_json_atomic(path: str, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str) -> Optional[Any]:
    """The JSON in `path`, None if it does not exist; WorkdirError if it cannot be parsed."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WorkdirError(f"{path} is not valid JSON ({e}). It was damaged or written by "
                           "something else: move it away (or fix it) and run again.") from e
    except IsADirectoryError as e:
        raise WorkdirError(f"{path} is a directory where a JSON file belongs; move it away.") from e


def read_json_object(path: str) -> Optional[Dict[str, Any]]:
    """`read_json` for files that must hold a JSON object (result.json, config.json)."""
    value = read_json(path)
    if value is not None and not isinstance(value, dict):
        raise WorkdirError(f"{path} holds {type(value).__name__} JSON where an object belongs: "
                           "it was damaged or written by something else. Move it away and run "
                           "again.")
    return value


def append_jsonl(path: str, record: Mapping[str, Any]) -> None:
    """Appends one line; a failed write leaves at most a partial last line, which the next
    start drops (read_jsonl with repair)."""
    line = json.dumps(dict(record)) + "\n"
    try:
        with open(path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise write_error(os.path.dirname(os.path.abspath(path)), e, len(line),
                          f"append to {os.path.basename(path)}") from e


def _write_jsonl(path: str, records: List[Dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def read_jsonl(path: str, repair: bool = False) -> List[Dict[str, Any]]:
    """The records of a JSON-lines file. A partial last line (a crash mid-append) is left out;
    with `repair` (only for the process that holds the run's lock) it is also dropped from the
    file, with a warning. A damaged line elsewhere is refused by name."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step", 0), int):
                raise WorkdirError(f"{path}, line {number}, is not a per-epoch record (a JSON "
                                   "object with an integer step). Move the file away (or delete "
                                   "that line) and run again.")
            records.append(record)
        except json.JSONDecodeError as e:
            if number != len(lines):  # a complete line (newline-terminated) that is damaged
                raise WorkdirError(f"{path}, line {number}, is not valid JSON ({e}). Move the "
                                   "file away (or delete that line) and run again.") from e
            if repair:  # no newline after it: the write never finished
                logging.warning("%s: dropping an incomplete last line (%d characters), left by "
                                "an interrupted write.", path, len(line))
                _write_jsonl(path, records)
    return records


def selection_accuracy(record: Mapping[str, Any]) -> float:
    """The accuracy an epoch's record competes on for best epoch and model selection:
    validation, or training accuracy when there is no validation split (val_size=0)."""
    return record.get("val_accuracy", record["train_accuracy"])


def epoch_record(path: str, epoch: int) -> Optional[Dict[str, Any]]:
    """One epoch's record of a metrics.jsonl (read-only), or None."""
    return next((r for r in read_jsonl(path) if r.get("epoch") == epoch), None)


def truncate_jsonl(path: str, max_step: int) -> None:
    """Drops records written after the step a run (re)starts from: a crash between appending
    an epoch's record and committing its checkpoint must not leave the record twice."""
    records = read_jsonl(path, repair=True)
    keep = [r for r in records if r.get("step", 0) <= max_step]
    if len(keep) != len(records):
        _write_jsonl(path, keep)


# ----------------------------------------------------------------------------------------------
# Space and permissions.


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def ensure_writable(directory: str, needed_bytes: int = 0, what: str = "write") -> None:
    """Raises WorkdirError, naming the directory, the free space and the size needed, unless a
    small probe file can be written there and `needed_bytes` (plus a margin) are free."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise WorkdirError(f"{directory} is a file, where a directory belongs: give another "
                           "--workdir (or move the file away).")
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write_probe_") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise write_error(directory, e, needed_bytes, what) from e
    free = shutil.disk_usage(directory).free
    if needed_bytes and free < needed_bytes * 1.1 + (16 << 20):
        raise write_error(directory, OSError(errno.ENOSPC, "not enough free space"),
                          needed_bytes, what)


# Advice that fits the cause of a failed write, by errno.
_WRITE_ADVICE = {
    errno.ENOSPC: "free space there",
    errno.EDQUOT: "raise the disk quota or free space there",
    errno.EACCES: "make it writable for this user (or use another --workdir)",
    errno.EPERM: "make it writable (check its permissions and attributes, e.g. lsattr), or use "
                 "another --workdir",
    errno.EROFS: "remount the file system read-write (or use another --workdir)",
    errno.ENAMETOOLONG: "use a shorter --workdir (a new workdir starts afresh)",
    errno.EIO: "check the disk (an I/O error can mean failing hardware)",
    errno.ENOTDIR: "a part of the path is a file, not a directory: give another --workdir (or "
                   "move the file away)",
}
_SPACE_ERRORS = (errno.ENOSPC, errno.EDQUOT)
# How tensorstore (orbax's storage layer) reports the OS error under a failed write.
_TENSORSTORE_ERRNO = re.compile(r"os_error_code='?(\d+)")
_TENSORSTORE_PATH = re.compile(r'(?:Failed writing|local file|Error opening file): "([^"]+)"')


def os_error_of(error: BaseException) -> Tuple[Optional[int], str, Optional[str]]:
    """(errno, its text, path) of the OS error under `error`: an OSError in its chain of
    causes, or the code that tensorstore writes into its messages; errno None when there is
    none (the text is then the error's first line)."""
    first = error
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno:
            return error.errno, error.strerror or os.strerror(error.errno), error.filename
        code = _TENSORSTORE_ERRNO.search(str(error))
        if code:
            path = _TENSORSTORE_PATH.search(str(error))
            return int(code.group(1)), os.strerror(int(code.group(1))), (
                path.group(1) if path else None)
        error = error.__cause__ or error.__context__
    text = (str(first).strip().splitlines() or [type(first).__name__])[0]
    return None, text if len(text) <= 200 else text[:200] + "...", None


def write_error(directory: str, error: BaseException, needed_bytes: int = 0,
                what: str = "write",
                then: str = "run the same command again (a run resumes where it stopped)"
                ) -> WriteError:
    """The one message for a failed write: where, the OS error as it is, advice that fits it
    (and for a lack of space, the free space and the size needed), and what to do `then`."""
    code, reason, path = os_error_of(error)
    details = [path] if path and path != directory else []
    if code in _SPACE_ERRORS or code is None:
        try:
            free = format_bytes(shutil.disk_usage(directory).free)
        except OSError:
            free = "unknown"
        details.append(f"{free} free" + (f", {format_bytes(needed_bytes)} needed"
                                         if needed_bytes else ""))
    if details:
        reason += f" ({'; '.join(details)})"
    advice = _WRITE_ADVICE.get(code, "fix the cause")
    return WriteError(f"Cannot {what} in {directory}: {reason}. Everything written before is "
                      f"intact: {advice}, then {then}.")


# ----------------------------------------------------------------------------------------------
# Ownership.


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class RunLock:
    """One live process owns a directory: an exclusive `flock` on `<directory>/<name>`, whose
    content says who holds it (host, pid, start time), and (`guard_directory`) one on the
    directory itself, which whatever happens to the files in it cannot undo: a second process
    is refused even after the lock file was deleted or replaced. (A file system without
    directory locks, such as some network ones, has the file lock alone.)

    The kernel drops the flocks when their process dies (even by kill -9), so a lock file left
    behind by a dead process on this host is taken over, with a log line. A file left by a
    process on another host is not: that process cannot be proven gone from here.
    """

    def __init__(self, directory: str, name: str = "run.lock", guard_directory: bool = True):
        self.directory = directory
        self.path = os.path.join(directory, name)
        self.guard_directory = guard_directory
        self._fd: Optional[int] = None
        self._dir_fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> str:
        info = self._read_info(self.path)
        if not info:
            return "another process (it has not written its details, or its lock file is gone)"
        return (f"process {info.get('pid')} on host {info.get('host')}, running since "
                f"{info.get('started', '?')}")

    @staticmethod
    def _read_info(path: str) -> Dict[str, Any]:
        try:
            with open(path) as f:
                info = json.loads(f.read() or "{}")
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return {}
        return info if isinstance(info, dict) else {}

    def try_acquire(self, blocking: bool = False) -> bool:
        """Takes the lock; False when a live process holds it (or waits, when blocking)."""
        assert self._fd is None, f"{self.path} is already held by this object"
        os.makedirs(self.directory, exist_ok=True)
        flags = fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB)
        if self.guard_directory and not self._lock_directory(flags):
            return False
        try:
            fd = self._lock_file(flags)
            if fd is None:
                self._unlock_directory()
                return False
            self._take_over_from(self._read_info(self.path))
            info = {"host": socket.gethostname(), "pid": os.getpid(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            os.fsync(fd)
        except BaseException as e:
            self._unlock_directory()
            if "fd" in locals() and fd is not None:
                os.close(fd)
            if isinstance(e, OSError):
                raise write_error(self.directory, e, what=f"write the lock file {self.path}") \
                    from e
            raise
        self._fd = fd
        return True

    def _lock_directory(self, flags: int) -> bool:
        """The flock on the directory; False when another process holds it."""
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, flags)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError:  # no directory locks on this file system: the file lock alone
            os.close(fd)
            return True
        self._dir_fd = fd
        return True

    def _unlock_directory(self) -> None:
        if self._dir_fd is not None:
            os.close(self._dir_fd)  # closing the last descriptor drops the flock
            self._dir_fd = None

    def _lock_file(self, flags: int) -> Optional[int]:
        """The locked lock file's descriptor; None when another process holds it."""
        while True:
            try:  # never through a link: the lock file is truncated and rewritten
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as e:
                raise self._unusable(e) from None
            try:
                fcntl.flock(fd, flags)
            except BlockingIOError:
                os.close(fd)
                return None
            try:  # a releasing holder may have unlinked the file after we opened it
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                return fd
            os.close(fd)

    def _unusable(self, error: OSError) -> Exception:
        """The one-line refusal for a lock path that cannot be a lock file."""
        if error.errno == errno.ELOOP:
            return WorkdirError(f"{self.path} is a symbolic link; a lock file must be a plain "
                                "file. Remove the link and run again.")
        if error.errno == errno.EISDIR or os.path.isdir(self.path):
            return WorkdirError(f"{self.path} is a directory; a lock file must be a plain file. "
                                "Move the directory away and run again.")
        return write_error(self.directory, error, what=f"create the lock file {self.path}")

    def _take_over_from(self, previous: Dict[str, Any]) -> None:
        if not previous:
            return
        host = socket.gethostname()
        if previous.get("host") != host:
            raise WorkdirError(
                f"{self.path} names process {previous.get('pid')} on host {previous.get('host')}, "
                f"which this host ({host}) cannot check. If that process is gone, delete "
                f"{self.path} and run again.")
        try:
            alive = _process_alive(int(previous.get("pid", -1)))
        except (TypeError, ValueError):
            alive = None
        state = {False: "no longer running", True: "a reused process id; its lock was released",
                 None: "its process id is unreadable; its lock was released"}[alive]
        logging.warning("Taking over %s from process %s on %s (started %s): %s.", self.path,
                        previous.get("pid"), host, previous.get("started", "?"), state)

    def acquire(self) -> "RunLock":
        """Takes the lock or raises WorkdirError naming the live holder."""
        if not self.try_acquire():
            raise WorkdirError(f"{self.directory} is in use by {self.holder()}. Wait for it "
                               "to finish, stop it, or use another --workdir.")
        return self

    def release(self) -> None:
        """Drops the lock and removes its file. Never raises: the flocks end with their
        descriptors whatever became of the file (deleted, replaced by a directory, on a file
        system turned read-only), so a file left behind only costs a take-over line."""
        if self._fd is None:
            return
        try:
            if os.path.samestat(os.fstat(self._fd), os.lstat(self.path)):
                os.unlink(self.path)
            else:
                logging.warning("%s is no longer the lock file this run created (replaced or "
                                "moved while it ran); left as it is.", self.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            logging.warning("Could not remove the lock file %s (%s); the lock is released, and "
                            "the next run takes the file over.", self.path,
                            e.strerror or e)
        finally:
            os.close(self._fd)
            self._fd = None
            self._unlock_directory()

    @classmethod
    def probably_held(cls, directory: str, name: str = "run.lock") -> bool:
        """Whether another live process seems to hold the lock, judged from the file alone
        (taking the lock to find out would make a concurrent claim fail): a lock file that
        names another live process on this host, or any process on another host."""
        info = cls._read_info(os.path.join(directory, name))
        if not info:
            return False
        if info.get("host") != socket.gethostname():
            return True
        try:
            pid = int(info.get("pid", -1))
        except (TypeError, ValueError):
            return False
        return pid != os.getpid() and _process_alive(pid)

    def __enter__(self):
        if not self.held:
            self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


# ----------------------------------------------------------------------------------------------
# The stored config and the result, the same for JAX and the PyTorch twin.


def latest_step_on_disk(workdir: str) -> Optional[int]:
    """The newest committed (orbax) checkpoint step of a run directory, from the listing
    alone."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return None
    steps = [int(n) for n in os.listdir(directory)
             if CHECKPOINT_STEP.match(n) and os.path.isdir(os.path.join(directory, n))]
    return max(steps, default=None)


def _holds_training(workdir: str) -> bool:
    """Whether anything trained is saved: a checkpoint (JAX or twin) or a completed run's
    weights. Without it a rerun starts from scratch, so any config change is harmless."""
    return latest_step_on_disk(workdir) is not None or any(
        os.path.exists(os.path.join(workdir, name))
        for name in ("torch_checkpoint.pt", "torch_best.pt", "best_weights"))


def check_stored_config(config, workdir: str) -> List[str]:
    """Refuses to resume a run whose stored config differs in a result-changing field; returns
    the differences allowed by allow_config_change (empty when there are none).

    Writes nothing: the caller stores the config once every start-up check has passed.
    """
    path = os.path.join(workdir, "config.json")
    stored = read_json_object(path)
    if stored is None:
        return []
    if not _holds_training(workdir):  # e.g. out of memory before the first checkpoint
        diffs = config_checks.result_changing_differences(stored, config)
        if diffs:
            logging.warning("%s holds no checkpoint yet: the run starts afresh with the new "
                            "config:\n  %s", workdir, "\n  ".join(diffs))
        return diffs
    fixed = config_checks.fixed_field_changes(stored, config)
    if fixed:
        raise config_checks.ConfigError(
            f"{workdir!r} holds a run whose checkpoints do not fit this config:\n  " +
            "\n  ".join(fixed) + "\nThese fields change the number of steps, the data or the "
            "saved state, so even allow_config_change cannot resume across them: use a new "
            "--workdir.")
    diffs = config_checks.result_changing_differences(stored, config)
    if diffs and not config.allow_config_change:
        raise config_checks.ConfigError(
            f"{workdir!r} holds a run with a different config:\n  " + "\n  ".join(diffs) +
            "\nUse a new --workdir, or pass --config.allow_config_change=true to resume with "
            "the new values.")
    if diffs:
        logging.warning("Resuming with a changed config (allow_config_change=true):\n  %s",
                        "\n  ".join(diffs))
    return diffs


def finished_run(config, workdir: str) -> Optional[Dict[str, Any]]:
    """The start-up checks both frameworks make on a run directory whose lock they hold.

    Returns the result of a finished run (completed, or diverged and rerun with the same
    config: it would diverge again), or None for a run to start or resume. Writes nothing but
    the repair of a partial last line in metrics.jsonl.
    """
    ensure_writable(workdir)
    previous = read_result(workdir)
    changed = check_stored_config(config, workdir)
    read_jsonl(os.path.join(workdir, "metrics.jsonl"), repair=True)
    status = (previous or {}).get("status")
    if status == "completed" or (status == "diverged" and not changed):
        logging.info("Run in %s already finished: %s.", workdir, status)
        return previous
    return None


def store_config(config, workdir: str) -> None:
    write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict())


def hyperparameters(config) -> Dict[str, Any]:
    """The fields that identify a trial, as they appear in result.json and results.csv."""
    return {"model": config.model, "optimizer": config.optimizer,
            "learning_rate": config.learning_rate, "weight_decay": config.weight_decay,
            "augmentation": config.data.augmentation,
            "dropout_rate": models.dropout_rate(config.model, config.dropout_rate),
            "label_smoothing": config.label_smoothing, "warmup_epochs": config.warmup_epochs,
            "ema_decay": config.ema_decay, "seed": config.seed}


def result_record(config, status: str, framework: str, **fields) -> Dict[str, Any]:
    """result.json: the outcome plus everything needed to tell which run it belongs to."""
    return {"status": status, "framework": framework, "num_epochs": config.num_epochs,
            "batch_size": config.batch_size, "precision": config.precision,
            "dtype": config.dtype, **hyperparameters(config), **fields}


def write_result(workdir: str, record: Mapping[str, Any]) -> None:
    write_json_atomic(os.path.join(workdir, "result.json"), dict(record))


def read_result(workdir: str) -> Optional[Dict[str, Any]]:
    return read_json_object(os.path.join(workdir, "result.json"))
