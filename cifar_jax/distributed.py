"""One run across several processes and hosts: JAX's multi-controller runtime.

Multi-process mode is exactly `num_processes > 1`: the flags --coordinator_address,
--num_processes and --process_id, or an `srun` step with more than one task (jax's own SLURM
detection). A SLURM array of one-task steps stays what it was: independent processes.

Every process runs the same program on its devices of one global mesh (`jax.devices()`), with
the whole data set on each of its devices; permutations and augmentation are functions of
(seed, step), so a result does not depend on the process count. Process 0, the writer, alone
writes the run's files and holds its lock for the group; every process takes part in orbax's
saves and restores. The processes agree where they could part ways: on start-up errors
(`agreed`), on stopping (`first_nonzero`, after every chunk of steps) and on a grid's next trials
(`broadcast_json`).

When a process dies, the others notice at their next collective (gloo, on the CPU: at once) or
by its missing heartbeats (HEARTBEAT_TIMEOUT_S), and stop with `PeerLost`. The coordination
service has no authentication: it listens on the coordinator's address only, which must be
reachable only inside the cluster's network.
"""

import dataclasses
import hashlib
import json
import os
import secrets
import socket
import sys
import threading
import time
from typing import Any, Callable, Optional, TypeVar

import numpy as np
from absl import logging

# Stated bounds (seconds). A process that has not joined after INITIALIZATION_TIMEOUT_S stops
# every process waiting for it; one that stops sending heartbeats (dead, or its host) for
# HEARTBEAT_TIMEOUT_S is declared dead to the others; SHUTDOWN_TIMEOUT_S bounds the exit's wait
# for the others.
INITIALIZATION_TIMEOUT_S = 60
HEARTBEAT_TIMEOUT_S = 20
SHUTDOWN_TIMEOUT_S = 60
_SHARED_TOKEN = ".shared_check"  # written by process 0, read by the others, then removed

T = TypeVar("T")


class GroupError(Exception):
    """The process group cannot be formed as asked (flags, environment, a process missing)."""


class PeerLost(Exception):
    """Another process of the run died or became unreachable; the run stops (exit 4)."""


class PeerFailed(Exception):
    """Another process of the run stopped at start-up with an error it printed itself."""


@dataclasses.dataclass(frozen=True)
class Group:
    coordinator_address: str  # HOST:PORT of process 0's coordination service
    num_processes: int
    process_id: int
    source: str = "flags"  # or "srun": SLURM's variables


def group_from(coordinator_address: Optional[str], num_processes: Optional[int],
               process_id: Optional[int]) -> Optional[Group]:
    """The group the flags (or SLURM's variables, when no flag is given) ask for; None for a
    single process."""
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if not any(given):
        return _slurm_group()
    if not all(given):
        raise GroupError("--coordinator_address, --num_processes and --process_id go together: "
                         "give all three (e.g. --coordinator_address=127.0.0.1:12355 "
                         "--num_processes=2 --process_id=0), or none for one process.")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise GroupError(f"--process_id={process_id} with --num_processes={num_processes}: "
                         "expected 0 <= process_id < num_processes.")
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise GroupError(f"--coordinator_address={coordinator_address!r} is not HOST:PORT "
                         "(e.g. 127.0.0.1:12355, or the first host's name and a free port).")
    if num_processes == 1:
        return None
    return Group(coordinator_address, num_processes, process_id)


def _slurm_group() -> Optional[Group]:
    """An `srun` step of more than one task, as jax's SLURM detection reads it."""
    env = os.environ
    needed = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID")
    if not all(k in env for k in needed) or int(env["SLURM_NTASKS"]) <= 1:
        return None
    from jax._src.clusters import SlurmCluster  # the address rule jax itself applies

    address = SlurmCluster.get_coordinator_address(None, env.get("JAX_COORDINATOR_PORT"))
    return Group(address, int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"]), "srun")


def initialize(group: Group) -> None:
    """Joins the group; before any other JAX call. Every process waits for all to join, at
    most INITIALIZATION_TIMEOUT_S, then stops with one line (jax alone would abort later and
    say only that a deadline passed). The wait runs in a thread, so that Ctrl-C and SIGTERM
    still stop a process whose partners never come."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives
    # jax's pre-emption notifier would take SIGTERM from the loop's handler; the processes agree
    # on stopping themselves (`first_nonzero`).
    jax.config.update("jax_enable_preemption_service", False)
    if group.process_id == 0:
        _check_bindable(group)
    outcome: list = []

    def join() -> None:
        try:
            jax.distributed.initialize(
                group.coordinator_address, group.num_processes, group.process_id,
                initialization_timeout=INITIALIZATION_TIMEOUT_S,
                heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
                shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S,
                # Not every interface: the service has no authentication.
                coordinator_bind_address=group.coordinator_address)
            outcome.append(None)
        except Exception as e:  # noqa: BLE001 - jax raises several types for a failed start
            outcome.append(e)

    joiner = threading.Thread(target=join, daemon=True)
    joiner.start()
    deadline = time.monotonic() + INITIALIZATION_TIMEOUT_S - 2
    while joiner.is_alive() and time.monotonic() < deadline:
        joiner.join(0.2)  # short waits: a signal another thread received is handled here
    if not outcome:
        _not_joined(group)
    if outcome[0] is not None:
        raise GroupError(f"process {group.process_id} of {group.num_processes} could not join "
                         f"the group at {group.coordinator_address}: "
                         f"{_first_line(outcome[0])}") from outcome[0]
    if group.process_id != 0:
        logging.set_verbosity(logging.ERROR)  # process 0 reports progress for the group
    logging.info("Process %d of %d joined the group at %s (%d devices in all, %d here).",
                 group.process_id, group.num_processes, group.coordinator_address,
                 jax.device_count(), jax.local_device_count())


def _check_bindable(group: Group) -> None:
    """Refuses a coordinator address process 0 cannot serve on: taken (gRPC would share the
    port with another run's service and break both), or not this host's."""
    host, _, port = group.coordinator_address.rpartition(":")
    host = host.strip("[]")
    try:
        family = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, int(port)))
    except OSError as e:
        raise GroupError(f"process 0 cannot serve the group at {group.coordinator_address} "
                         f"({e.strerror or e}): give this host's address and a free port (the "
                         "port may be held by another run; each group needs its own).") from e


def _not_joined(group: Group) -> None:
    how = ("every task of the srun step" if group.source == "srun" else
           f"all {group.num_processes} with the same --coordinator_address and "
           "--num_processes and each with its own --process_id")
    print(f"error: process {group.process_id} of {group.num_processes}: not every process "
          f"joined {group.coordinator_address} within {INITIALIZATION_TIMEOUT_S} s. Start "
          f"{how}, and check that the address is reachable from every host.",
          file=sys.stderr, flush=True)
    os._exit(2)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__


# ----------------------------------------------------------------------------------------------
# Who we are.


def multiprocess() -> bool:
    import jax

    return jax.process_count() > 1


def is_writer() -> bool:
    """Process 0: the one that writes the run's files."""
    import jax

    return jax.process_index() == 0


def describe() -> str:
    import jax

    return f"process {jax.process_index()} of {jax.process_count()}"


# ----------------------------------------------------------------------------------------------
# Agreement. Every function here is a collective: all processes call it at the same point.


def _gather(x: np.ndarray) -> np.ndarray:
    """`x` of every process, stacked (a leading process axis)."""
    from jax.experimental import multihost_utils

    try:
        return np.asarray(multihost_utils.process_allgather(x))
    except Exception as e:  # noqa: BLE001 - see lost()
        raise lost(e, "while the processes compared notes", True) from e


def _from(x: np.ndarray, is_source: bool) -> np.ndarray:
    """The source process's `x` in every process."""
    from jax.experimental import multihost_utils

    try:
        return np.asarray(multihost_utils.broadcast_one_to_all(x, is_source=is_source))
    except Exception as e:  # noqa: BLE001 - see lost()
        raise lost(e, "while waiting for another process's word", True) from e


def first_nonzero(value: int) -> int:
    """The first process's non-zero `value`, or 0 (e.g. a pre-emption signal that reached
    one of them)."""
    if not multiprocess():
        return int(value)
    values = _gather(np.asarray(value, np.int32))
    return int(values[np.flatnonzero(values)[0]]) if values.any() else 0


def broadcast_json(value: Any = None, source: int = 0) -> Any:
    """Process `source`'s `value` (JSON-able) in every process."""
    if not multiprocess():
        return value
    import jax

    mine = jax.process_index() == source
    data = json.dumps(value).encode() if mine else b""
    size = int(_from(np.int32(len(data)), mine))
    buffer = np.zeros(1 << max(4, (size - 1).bit_length()), np.uint8)  # few distinct shapes
    buffer[:len(data)] = np.frombuffer(data, np.uint8)
    return json.loads(bytes(_from(buffer, mine)[:size]).decode())


def agreed(fn: Callable[[], T], undo: Optional[Callable[[T], None]] = None) -> T:
    """`fn()` in every process, its errors made common: when any process fails, all stop
    together, the first failing process with its own error (which it prints) and the others
    with `PeerFailed` (which they do not), so that no process waits for the others in a
    collective they never reach. `undo(value)` releases what `fn` took where it succeeded
    but another process failed."""
    if not multiprocess():
        return fn()
    import jax

    try:
        value, error = fn(), None
    except Exception as e:  # noqa: BLE001 - re-raised below, in every process
        value, error = None, e
    failed = _gather(np.asarray(error is not None))
    if not failed.any():
        return value
    if error is None and undo is not None:
        undo(value)
    first = int(np.argmax(failed))
    message = broadcast_json(_first_line(error) if error is not None else None, source=first)
    if jax.process_index() == first:
        error.agreed = True  # every process stops here together (cli: a normal exit)
        raise error
    raise PeerFailed(f"process {first} stopped: {message}")


def require_same(what: str, text: str) -> None:
    """Raises GroupError in every process unless `text` (say, the config and flags) is the
    same in all of them: processes that train different things would wait for each other in
    collectives that never match."""
    if not multiprocess():
        return
    digest = np.frombuffer(hashlib.sha256(text.encode()).digest()[:16], np.uint8)
    digests = _gather(digest)
    differ = [i for i in range(len(digests)) if not np.array_equal(digests[i], digests[0])]
    if differ:
        raise GroupError(f"processes {', '.join(map(str, differ))} were started with other "
                         f"{what} than process 0: start every process with the same command "
                         "line except --process_id.")


# What a collective's failure says when its partner is gone: gloo's errors (CPU), NCCL's, and
# the coordination service's.
_LOST_SIGNS = ("Gloo", "NCCL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "Connection", "coordination")


def lost(error: BaseException, where: str, in_collective: bool = False
         ) -> Optional[PeerLost]:
    """A collective that failed because another process is gone, in multi-process mode, as
    the one line that says what happened and how to go on; None for any other error (an
    out-of-memory error, a damaged file, ...). `in_collective`: `error` came from one of this
    module's own collectives, which fail for no other reason."""
    import jax

    if isinstance(error, PeerLost):  # said again with the caller's `where`
        error, in_collective = error.__cause__ or error, True
    runtime = isinstance(error, jax.errors.JaxRuntimeError) or type(error) in (
        ValueError, RuntimeError)  # multihost_utils re-raises gloo's errors as ValueError
    gone = in_collective or (runtime and any(sign in str(error) for sign in _LOST_SIGNS))
    if not (gone and multiprocess()):
        return None
    where = f" {where}" if where else ""
    return PeerLost(f"{describe()} lost contact with the others{where} ({_first_line(error)}): "
                    "another process died, was killed, or its host became unreachable. "
                    "Checkpoints already saved are intact: start every process again with the "
                    "same command to resume.")


# ----------------------------------------------------------------------------------------------
# The workdir every process must see.


def check_shared(directory: str) -> None:
    """Every process sees process 0's files in `directory` (a file system all hosts share);
    a collective. Raises GroupError in a process that does not."""
    if not multiprocess():
        return
    path = os.path.join(directory, _SHARED_TOKEN)
    token = secrets.token_hex(8) if is_writer() else None

    def write() -> None:
        if token is not None:
            with open(path, "w") as f:
                f.write(token)

    agreed(write)
    token = broadcast_json(token)

    def read() -> None:
        try:
            with open(path) as f:
                seen = f.read()
        except OSError:
            seen = None
        if seen != token:
            raise GroupError(f"{describe()} cannot see {directory} as process 0 wrote it: a run "
                             "over several hosts needs a workdir on a file system every host "
                             "shares (NFS, Lustre, GPFS), at the same path.")

    try:
        agreed(read)
    finally:
        if is_writer() and os.path.exists(path):
            os.remove(path)
