"""Orbax checkpoints of one run: the latest few and the best, in one CheckpointManager.

Layout in the workdir:
  checkpoints/<step>/   full train states (params, batch stats, optimizer state, step, RNG key,
                        hyperparameters, EMA) plus a JSON `meta` item (epoch, position in the
                        epoch, best so far, train time) and, at epoch ends, the selection metric
  best_weights/         written when the run completes: the best epoch's weights and batch
                        statistics (and EMA) only; the full checkpoints are then removed unless
                        config.keep_full_checkpoints

Retention is orbax's preservation policy: the latest `max_to_keep` plus the best by validation
accuracy (earliest on ties). Orbax deletes a superseded checkpoint only once its replacement
is committed, so a save that fails leaves the previous latest and best intact; the failure
stops the run (WorkdirError, exit 2). Before each save the directory is probed and the free
space compared with the state's size, so a full or read-only disk is reported at once.
"""

import gc
import os
import re
import shutil
import time
from typing import Any, Dict, Optional, Tuple

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from cifar_jax import distributed, native, workdir as workdir_lib
from cifar_jax.workdir import WorkdirError

_TMP_DIR = re.compile(r"^\d+\.orbax-checkpoint-tmp")


class CheckpointError(RuntimeError):
    """No readable checkpoint where checkpoints exist."""


def error_summary(error: BaseException) -> str:
    """An error's type and first line: libraries reading a damaged file (tensorstore, torch)
    put whole tracebacks or dumps after it."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def _selection_key(metrics: Dict[str, Any]):
    # Higher validation accuracy is better; on ties the earlier step wins.
    return metrics["selection"], -metrics["step"]


def nbytes(tree: Any) -> int:
    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def check_layout(directory: str) -> None:
    """Refuses, by name, what orbax would trip over later: a file where the checkpoint
    directory belongs, or entries in it that are neither step directories nor orbax's own
    temporary ones."""
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise WorkdirError(f"{directory} is a file, where the checkpoint directory belongs. Move "
                           "it away (or use another --workdir) and run again.")
    if not os.path.isdir(directory):
        return
    foreign = [name for name in sorted(os.listdir(directory))
               if not (os.path.isdir(os.path.join(directory, name))
                       and (workdir_lib.CHECKPOINT_STEP.match(name) or _TMP_DIR.match(name)))]
    if foreign:
        raise WorkdirError(f"{directory} holds entries that are not checkpoints: "
                           f"{', '.join(foreign[:5])}. Move them away and run again.")


def remove_unfinished(directory: str) -> None:
    """Deletes temporary directories of saves that never completed (a crash, a full disk).

    Orbax would clean them up itself, but asynchronously, and a save of the same step reuses
    the same temporary name: the two race. Removing them first, synchronously, avoids that.
    """
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if _TMP_DIR.match(name):
            logging.warning("Removing %s/%s, left by a save that did not complete.", directory,
                            name)
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def checkpoint_tree(state, epoch_metrics) -> Dict[str, Any]:
    """What a checkpoint holds: one trial's train state and its epoch's metrics so far."""
    return {"train_state": flax.serialization.to_state_dict(state),
            "epoch_metrics": flax.serialization.to_state_dict(epoch_metrics)}


def restore_template(abstract) -> Dict[str, Any]:
    """A checkpoint's structure, shapes and dtypes (nothing allocated), from the abstract
    train state (`jax.eval_shape` of one)."""
    from cifar_jax.engine import Metrics

    return checkpoint_tree(abstract, jax.eval_shape(Metrics.empty))


def _this_process_only() -> ocp.options.MultiprocessingOptions:
    """Orbax options for a read this process makes on its own (a multi-process run's process 0
    writing the report): orbax would otherwise wait for the others at its barriers."""
    index = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=index, active_processes={index})


def load_weights(directory: str, template: Dict[str, Any]) -> Dict[str, Any]:
    """The best weights a completed run keeps (`best_weights/`), shaped like `template`; reads
    only (a run directory can be served read-only), in this process alone."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    with native.quiet_stderr():
        try:
            with ocp.StandardCheckpointer(
                    multiprocessing_options=_this_process_only()) as checkpointer:
                return checkpointer.restore(directory, abstract)
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            raise CheckpointError(f"{directory} is unreadable ({error_summary(e)}): the run's "
                                  "kept weights are damaged or incomplete.") from e


class Checkpoints:
    def __init__(self, workdir: str, max_to_keep: int = 2, this_process_only: bool = False):
        """`this_process_only`: reads by one process on its own (see `_this_process_only`);
        by default every process of a multi-process run takes part in each save and read."""
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        self.weights_directory = os.path.join(self.workdir, "best_weights")
        check_layout(self.directory)
        if distributed.is_writer():  # one process deletes; the others' managers ignore them
            remove_unfinished(self.directory)
        pp = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            best_fn=_selection_key, best_mode="max", create=True,
            cleanup_tmp_directories=True, enable_async_checkpointing=True,
            **({"multiprocessing_options": _this_process_only()} if this_process_only else {}),
            preservation_policy=pp.AnyPreservationPolicy([
                pp.LatestN(max_to_keep),
                pp.BestN(get_metric_fn=_selection_key, n=1,
                         keep_checkpoints_without_metrics=False)]))
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta"))
        self._last_size = 0
        self._failed = False  # a write failed: the run stops; nothing more to wait for

    # -- saving ---------------------------------------------------------------------------------

    def save(self, step: int, state: Any, meta: Dict[str, Any],
             selection: Optional[float] = None) -> None:
        """Starts an asynchronous save of `state` at `step`. `selection` (validation accuracy
        at an epoch end) makes it a candidate for the best checkpoint."""
        # Host arrays: orbax takes a device array in one process for a shard of a global one.
        state = jax.device_get(state)
        self._last_size = nbytes(state)
        workdir_lib.ensure_writable(self.directory, self._last_size, "save a checkpoint")
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave(meta))
        metrics = None if selection is None else {"selection": float(selection), "step": step}
        try:
            if step not in self.manager.all_steps():
                self.manager.save(step, args=args, metrics=metrics, force=True)
        except Exception as e:  # orbax and tensorstore raise many types for a failed write
            raise self._write_error(e) from e

    def poll(self) -> None:
        """Raises WorkdirError if a finished background save failed (cheap; call often)."""
        if not self.manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._write_error(e) from e

    def _write_error(self, error: BaseException) -> workdir_lib.WriteError:
        self._failed = True
        return workdir_lib.write_error(self.directory, error, self._last_size,
                                       "save a checkpoint")

    # -- restoring ------------------------------------------------------------------------------

    def _restore(self, step: int, template) -> Tuple[Any, Dict[str, Any]]:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def _try_restore(self, step: int, template):
        """(state, meta, None), or (None, None, the error's first line) for a damaged one."""
        with native.quiet_stderr():  # tensorstore's tracebacks after a failed read
            try:
                return (*self._restore(step, template), None)
            except Exception as e:  # orbax/tensorstore raise many types for damaged files
                error = error_summary(e)
            gc.collect()  # the failed read's abandoned tasks report while it is quiet
            time.sleep(0.2)
        return None, None, error

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def restore_latest(self, template, max_step: Optional[int] = None
                       ) -> Optional[Tuple[int, Any, Dict[str, Any]]]:
        """Restores the newest readable checkpoint (at or before `max_step`); falls back to
        older ones if one is corrupt.

        Returns None when there is no checkpoint at all; raises CheckpointError when
        checkpoints exist but none (at or before `max_step`) can be read: never silently
        start from scratch over them.
        """
        all_steps = sorted(self.manager.all_steps(), reverse=True)
        steps = [s for s in all_steps if max_step is None or s <= max_step]
        errors = []
        for step in steps:
            state, meta, error = self._try_restore(step, template)
            if error is not None:
                logging.error("Checkpoint %s/%d is unreadable (%s); trying an older one.",
                              self.directory, step, error)
                errors.append(f"step {step}: {error}")
                continue
            self._drop_after(step)
            return step, state, meta
        if all_steps:
            limit = "" if max_step is None else f" at or before step {max_step}"
            raise CheckpointError(
                f"No checkpoint in {self.directory}{limit} can be read:\n  " +
                "\n  ".join(errors or ["(none that early)"]) + "\nRefusing to start from "
                "scratch over them: move the directory away (or use a new --workdir) to start "
                "a fresh run.")
        return None

    def _drop_after(self, step: int) -> None:
        """Deletes checkpoints newer than the one resumed from (unreadable ones, or a pack's
        members ahead of the others): training redoes them, and they must not shadow the
        new saves at the same steps."""
        for newer in [s for s in self.manager.all_steps() if s > step]:
            logging.warning("Removing checkpoint %s/%d: training resumes from step %d and "
                            "writes it again.", self.directory, newer, step)
            self.manager.delete(newer)

    def best_step(self) -> Optional[int]:
        """The step of the best epoch-end checkpoint (mid-epoch ones are never best)."""
        return self.manager.best_step()

    def restore_best(self, template) -> Optional[Tuple[int, Any, Dict[str, Any]]]:
        """The best epoch's checkpoint; CheckpointError, with the way out, if it is damaged."""
        step = self.best_step()
        if step is None:
            return None
        state, meta, error = self._try_restore(step, template)
        if error is not None:
            raise CheckpointError(
                f"The best checkpoint, {self.directory}/{step}, is unreadable ({error}). "
                f"Move it out of {self.directory} and run the same command again: the run then "
                "keeps the best of its remaining epoch checkpoints.")
        return step, state, meta

    # -- the completed run ----------------------------------------------------------------------

    def save_weights(self, weights: Dict[str, Any]) -> None:
        """Writes the weights a completed run keeps (synchronously; replaces earlier ones)."""
        weights = jax.device_get(weights)  # host arrays, as in save()
        workdir_lib.ensure_writable(self.workdir, nbytes(weights), "save the best weights")
        try:
            with ocp.StandardCheckpointer() as checkpointer:
                checkpointer.save(self.weights_directory, weights, force=True)
                checkpointer.wait_until_finished()
        except Exception as e:
            raise workdir_lib.write_error(self.workdir, e, nbytes(weights),
                                          "save the best weights") from e

    def has_weights(self) -> bool:
        return os.path.isdir(self.weights_directory)

    def load_weights(self, template: Dict[str, Any]) -> Dict[str, Any]:
        return load_weights(self.weights_directory, template)

    def remove_full_checkpoints(self) -> None:
        """Deletes the full train states once the best weights are saved."""
        self.wait()
        for step in self.manager.all_steps():
            self.manager.delete(step)

    def close(self) -> None:
        """Waits for the last save and closes the manager; after a failed write, neither (the
        failure was raised once, and orbax's threads may take long to give up on a broken
        file system): the process is on its way out."""
        if self._failed:
            return
        try:
            self.wait()
        finally:
            if not self._failed:
                self.manager.close()
