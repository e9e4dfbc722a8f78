"""Command-line plumbing shared by every entry point (main, report, bench, the twin).

- `--help` (or -h, --helpshort, --helpfull) prints the usage and exits 0.
- A bad flag or a misspelt config field prints one line, with the suggestion where there is
  one, and exits 2 before anything is loaded.
- A known error (bad config, data or workdir) prints one line `error: ...` and exits 2; a
  non-finite loss exits 3, a pre-emption (SIGTERM, or Ctrl-C while training) 143, Ctrl-C
  outside training (e.g. while the data loads) 130. Each is printed once.
- Library chatter (TensorFlow's C++ start-up lines, the TPU probe, orbax's per-save lines) is
  kept out of the log; warnings still show.
"""

import logging as py_logging
import os
import signal
import sys
import traceback
from typing import Callable

from absl import app, flags, logging

from cifar_jax import native

HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull")


class UsageError(Exception):
    """The command line is wrong; the message says how to fix it."""


def define_trained_model_flags(what: str) -> None:
    """--workdir, --model and --seed of the commands that use a trained model (predict,
    evaluate, export: cifar_jax.inference.load)."""
    flags.DEFINE_string("workdir", None, "A finished run's workdir, or a grid's (with --model).")
    flags.DEFINE_string("model", None, f"Grid workdirs: the model whose selected configuration "
                        f"to {what}.")
    flags.DEFINE_integer("seed", None, "Grid workdirs: that configuration's trial with this "
                         "seed (default 0).")
    flags.mark_flag_as_required("workdir")


def check_workdir_flag(workdir: str) -> None:
    """Refuses an empty --workdir (it would mean the current directory) or a flag in its place."""
    if not workdir.strip():
        raise UsageError("--workdir is empty: give the directory for checkpoints and results, "
                         "e.g. --workdir runs/x.")
    if workdir.startswith("-"):
        raise UsageError(f"--workdir={workdir!r} looks like a flag, not a directory: give the "
                         "directory right after --workdir.")


class _Terminated(BaseException):
    """SIGTERM arrived outside training (which installs its own handler). Not an Exception, so
    that no `except Exception` (a grid isolating a trial's failure) takes it for a failure."""


def _on_sigterm(signum, frame):
    raise _Terminated


def _exit_codes():
    """(exception types, exit status, whether to print it: a diverged run has logged it, and
    a process whose peer failed at start-up leaves the line to that peer)."""
    from cifar_jax import checkpointing, config_checks, distributed, input_pipeline, stopping, \
        workdir
    return ((stopping.Preempted, 143, True), (stopping.Diverged, 3, False),
            (distributed.PeerLost, 4, True), (distributed.PeerFailed, 2, False),
            ((config_checks.ConfigError, input_pipeline.DataError, workdir.WorkdirError,
              checkpointing.CheckpointError, distributed.GroupError, UsageError, OSError), 2,
             True))


def _in_group() -> bool:
    """Multi-process mode (asked without starting a JAX backend)."""
    return "jax" in sys.modules and sys.modules["jax"].distributed.is_initialized()


def _exit_with(error: BaseException, code: int, show: bool) -> None:
    """Prints the error's one line (unless `show` is False) and exits with `code`.

    Multi-process mode: outcomes every process reached together (a pre-emption, a divergence,
    start-up errors made common by `distributed.agreed`) exit normally, through jax's shutdown,
    and process 0 alone says a pre-emption; any other error is this process's own, and it
    exits at once: the others, waiting for it in a collective, then fail at once too, where
    jax's shutdown would wait minutes for them."""
    from cifar_jax import distributed, stopping

    together = True
    if _in_group():
        together = isinstance(error, (stopping.Preempted, stopping.Diverged,
                                      distributed.PeerFailed)) or getattr(error, "agreed", False)
        show = show and (not isinstance(error, stopping.Preempted) or distributed.is_writer())
    if show:
        print(str(error) if code == 143 else f"error: {error}", file=sys.stderr)
    if not together:
        _exit_at_once(code)
    if not _in_group():  # a group leaves together, through jax's shutdown
        _exit_now_if_write_failed(error, code)
    sys.exit(code)


def _exit_in_group(error: BaseException) -> None:
    """An unexpected error in multi-process mode: a lost process's collective said in one
    line (exit 4), anything else (a bug) with its traceback; out at once (see _exit_with)."""
    from cifar_jax import distributed

    lost = distributed.lost(error, "")
    if lost is not None:
        _exit_with(lost, 4, True)
    traceback.print_exc()
    _exit_at_once(1)


def _config_load_failure(text: str) -> str:
    """ml_collections' message for a config file it could not load (a traceback, or a list of
    the paths it tried, flattened into the message) ends with the cause."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"cannot load the config file: {lines[-1] if lines else text}"


def _flag_error_text(error: BaseException) -> str:
    """One line for a flag-parsing error; ml_collections' misspelt-field errors included."""
    inner = error.args[0] if error.args else error
    if isinstance(inner, KeyError) and inner.args:
        inner = inner.args[0]
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    if "Error whilst parsing config file" in str(inner):
        return _config_load_failure(str(inner))
    if isinstance(error, (AttributeError, KeyError)):  # ml_collections: a field it lacks
        name = lines[0].strip("'\"") if lines else "?"
        hint = f" {lines[1]}" if len(lines) > 1 and lines[1].startswith("Did you mean") else ""
        return f"no config field {name!r}.{hint}"
    return " ".join(lines)


def _parse_flags(argv):
    if any(a in HELP_FLAGS for a in argv[1:]):
        app.usage(shorthelp="--helpfull" not in argv, writeto_stdout=True, exitcode=0)
    try:
        argv = flags.FLAGS(argv)
        _check_config_loaded()
        return argv
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        print(f"error: {_flag_error_text(e)} (see --help)", file=sys.stderr)
        sys.exit(2)


def _check_config_loaded() -> None:
    """A --config file that could not be loaded is only an error object until it is used:
    say why now, in one line."""
    if "config" not in flags.FLAGS or flags.FLAGS["config"].value is None:
        return
    config = flags.FLAGS["config"].value
    if type(config).__name__ == "_ErrorConfig":  # ml_collections' stand-in for a failed load
        try:
            config.to_dict()
        except Exception as e:  # noqa: BLE001 - its message is the reason
            raise ValueError(f"--config: {_config_load_failure(str(e))}") from None


# Warnings that say nothing wrong: orbax on a mid-epoch save (no validation metric by design);
# tfds probing a data directory before CIFAR-10 is prepared (the run says what it does next);
# asyncio on orbax's abandoned reads of a damaged checkpoint (the run names the checkpoint).
_EXPECTED_WARNINGS = ("did not provide metrics", "has no dataset_info.json",
                      "Task exception was never retrieved")


class _QuietLibraries(py_logging.Filter):
    def filter(self, record):
        path = record.pathname
        if record.levelno >= py_logging.WARNING:
            if "orbax" in path and _os_failure(record):
                return False  # the run reports the failed write once, with what to do
            return not any(t in record.getMessage() for t in _EXPECTED_WARNINGS)
        return "orbax" not in path and "xla_bridge" not in path


def _os_failure(record) -> bool:
    """Whether a log record is about an OS error (a failed write or read, of any kind), as
    orbax logs it from each of its threads before the call that failed raises."""
    from cifar_jax import workdir

    error = record.exc_info[1] if record.exc_info else None
    return (error is not None and workdir.os_error_of(error)[0] is not None) or bool(
        workdir.os_error_of(RuntimeError(record.getMessage()))[0] is not None
        or "[Errno " in record.getMessage())


def quiet_library_logs() -> None:
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if not isinstance(sys.stderr, native.TracebackFilter):
        sys.stderr = native.TracebackFilter(sys.stderr, ("RuntimeError: Event loop is closed",))


def _exit_now_if_write_failed(error: BaseException, code: int) -> None:
    """After a failed write, exits at once: what was written before is intact (the error says
    so), and waiting for a storage library's background threads to give up on a broken file
    system (at interpreter shutdown) can take minutes."""
    from cifar_jax import workdir

    if isinstance(error, workdir.WriteError):
        _exit_at_once(code)


def _exit_at_once(code: int) -> None:
    """Exits without the interpreter's shutdown, whose waits and crashes the callers avoid.
    An interruption outside training can come in the middle of a compilation or a data load,
    whose threads may still run; finalising the interpreter under them has crashed (exit 139
    instead of 143). The `with` blocks between here and the error have already released what
    they held."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(main: Callable, positional: bool = False) -> None:
    """absl's app.run with the behaviour described in the module docstring; `positional`: the
    command takes arguments besides its flags (main gets them in argv[1:])."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow's C++ INFO lines

    def wrapped(argv):
        if len(argv) > 1 and not positional:
            print(f"error: unexpected arguments: {' '.join(argv[1:])} (see --help)",
                  file=sys.stderr)
            sys.exit(2)
        quiet_library_logs()
        signal.signal(signal.SIGTERM, _on_sigterm)  # training installs its own while it runs
        try:
            return main(argv)
        except KeyboardInterrupt:
            print("Interrupted.", file=sys.stderr)
            _exit_at_once(130)
        except _Terminated:
            print("Stopped by SIGTERM outside training; nothing needed saving.", file=sys.stderr)
            _exit_at_once(143)
        except Exception as e:
            for kinds, code, show in _exit_codes():
                if isinstance(e, kinds):
                    _exit_with(e, code, show)
            if _in_group():
                _exit_in_group(e)
            raise

    app.run(wrapped, flags_parser=_parse_flags)
