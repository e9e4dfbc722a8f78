"""Orbax checkpoints of the full train state: the latest few, and the best one kept apart.

Layout in the workdir:
  checkpoints/<step>/        latest `max_to_keep` states (params, batch stats, optimizer
                             state, step, RNG key, dropout rate) plus a JSON `meta` item
                             (epoch, position in the epoch, status)
  best_checkpoint/<step>/    the state with the best validation accuracy so far
  best.json                  pointer to it: step, epoch, val accuracy

Retention of the latest is by step only: the best state is a separate manager, because
driving retention with `best_fn` would delete the newest checkpoints.
"""

import os
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from absl import logging

from cifar_jax.metric_writing import read_json, write_json_atomic


class CheckpointError(RuntimeError):
    """No readable checkpoint where checkpoints exist."""


def _manager(directory: str, max_to_keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=True)
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


class Checkpoints:
    def __init__(self, workdir: str, max_to_keep: int = 2):
        self.workdir = os.path.abspath(workdir)
        self.latest = _manager(os.path.join(self.workdir, "checkpoints"), max_to_keep)
        self.best = _manager(os.path.join(self.workdir, "best_checkpoint"), 1)
        self.best_pointer = os.path.join(self.workdir, "best.json")

    def save(self, step: int, state: Any, meta: Dict[str, Any], best: bool = False):
        """Starts an (asynchronous) save of `state` at `step`; `best` also replaces the best."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        if step not in self.latest.all_steps():
            self.latest.save(step, args=args, force=True)
        if best:
            self.best.wait_until_finished()
            for old in self.best.all_steps():
                self.best.delete(old)
            self.best.save(step, args=args, force=True)
            self.best.wait_until_finished()
            write_json_atomic(self.best_pointer, {"step": step, **meta})

    def wait(self):
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def _restore(self, manager, step, template) -> Tuple[Any, Dict[str, Any]]:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        out = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def restore_latest(self, template) -> Optional[Tuple[int, Any, Dict[str, Any]]]:
        """Restores the newest readable checkpoint; falls back to older ones if one is corrupt.

        Returns None when there is no checkpoint at all; raises CheckpointError when
        checkpoints exist but none can be read (never silently start from scratch).
        """
        steps = sorted(self.latest.all_steps(), reverse=True)
        errors = []
        for step in steps:
            try:
                state, meta = self._restore(self.latest, step, template)
            except Exception as e:  # orbax/tensorstore raise many types for damaged files
                logging.error("Checkpoint %s/checkpoints/%d is unreadable (%s: %s); trying an "
                              "older one.", self.workdir, step, type(e).__name__, e)
                errors.append(f"step {step}: {type(e).__name__}: {e}")
                continue
            return step, state, meta
        if steps:
            raise CheckpointError(
                f"None of the checkpoints in {self.workdir}/checkpoints can be read:\n  " +
                "\n  ".join(errors) + "\nRefusing to start from scratch over them: move the "
                "directory away (or use a new --workdir) to start a fresh run.")
        return None

    def restore_best(self, template) -> Optional[Tuple[int, Any, Dict[str, Any]]]:
        steps = self.best.all_steps()
        if not steps:
            return None
        state, meta = self._restore(self.best, steps[-1], template)
        return steps[-1], state, meta

    def best_info(self) -> Optional[Dict[str, Any]]:
        return read_json(self.best_pointer)

    def close(self):
        self.wait()
        self.latest.close()
        self.best.close()
