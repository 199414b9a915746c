"""Checkpoints of the full TrainState, the data-iterator position and the gin config, with
orbax's CheckpointManager (async, keep the last N). A latest checkpoint that cannot be read is
moved aside with a warning and the previous one is used."""
from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from sparsejax.parallel.rules import path_str

log = logging.getLogger(__name__)


class Checkpointer:
    """Saves and restores {state, data, config} items of one workdir."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True),
            item_names=("state", "data", "config"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_args: Any, config: dict, *, force: bool = False):
        items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
        if data_args is not None:
            items["data"] = data_args
        self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()

    def _saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        """{state path: shape} of the checkpoint at `step` (from its metadata)."""
        meta = ocp.StandardCheckpointer().metadata(
            os.path.join(self.directory, str(step), "state"))
        return {path_str(p): tuple(x.shape) for p, x in
                jax.tree_util.tree_leaves_with_path(getattr(meta, "item_metadata", meta))}

    def check_compatible(self, abstract_state: Any, resizes: tuple[str, ...] = ()) -> None:
        """Raises ValueError if the newest checkpoint holds arrays of other shapes (a different
        model or sparsity/MoE setup), before anything is compiled. Leaves named in `resizes`
        (a method that shrinks layouts: `SparsityMethod.resizes`) may be saved smaller along
        any axis."""
        step = self.manager.latest_step()
        if step is None:
            return
        try:
            have = self._saved_shapes(step)
        except Exception:  # unreadable metadata: restore_latest's fallback handles it
            return
        if not have:
            return
        want = {path_str(p): tuple(x.shape) for p, x in
                jax.tree_util.tree_leaves_with_path(abstract_state)}
        have = {k: want[k] if k in want and _shrunk(k, v, want[k], resizes) else v
                for k, v in have.items()}
        problems = [f"{k}: checkpoint {have.get(k, 'missing')} vs model {v}"
                    for k, v in want.items() if k.startswith("params/") and have.get(k) != v]
        problems += [f"{k}: in the checkpoint, not in the model" for k in have
                     if k.startswith("params/") and k not in want]
        if not problems and sorted(have.values()) != sorted(want.values()):
            problems.append("optimizer/sparsity/MoE state arrays differ")
        if problems:
            raise ValueError(
                f"workdir {os.path.dirname(self.directory)} holds a checkpoint (step {step}) of "
                f"a different model shape ({'; '.join(problems[:3])}); use a new --workdir or "
                f"the config that wrote it")

    def restore_latest(self, abstract_state: Any, data_args_fn,
                       resizes: tuple[str, ...] = ()) -> tuple[int, Any, dict] | None:
        """Restores the newest readable checkpoint into `abstract_state` (ShapeDtypeStructs with
        shardings). `data_args_fn()` gives the data-iterator restore args (or None).
        Returns (step, state, config item) or None if there is no checkpoint (the data
        iterator given by `data_args_fn` is moved to the saved position in place). Leaves
        named in `resizes` are restored at the (smaller) shapes they were saved with."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            target = abstract_state
            data_args = data_args_fn()
            try:
                if resizes:
                    target = _resized(abstract_state, self._saved_shapes(step), resizes)
                items = {"state": ocp.args.StandardRestore(target),
                         "config": ocp.args.JsonRestore()}
                if data_args is not None:
                    items["data"] = data_args
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
                _check_shapes(restored["state"], target)
                return step, restored["state"], restored["config"]
            except Exception as e:  # corrupt or half-written: move aside, try the previous one
                log.warning("checkpoint at step %d in %s is unreadable (%s: %s); moving it aside "
                            "and trying the previous one", step, self.directory, type(e).__name__,
                            str(e).splitlines()[0][:200] if str(e) else "")
                self._move_aside(step)
        return None

    def _move_aside(self, step: int):
        path = os.path.join(self.directory, str(step))
        if os.path.isdir(path):
            dest = os.path.join(self.directory, f"corrupt.{step}")
            n = 0
            while os.path.exists(dest):
                n += 1
                dest = os.path.join(self.directory, f"corrupt.{step}.{n}")
            shutil.move(path, dest)
        self.manager.reload()


def _shrunk(path: str, saved: tuple[int, ...], model: tuple[int, ...],
            resizes: tuple[str, ...]) -> bool:
    """Is the saved leaf at `path` a layout the run's method shrank from the model's shape?"""
    return (path.rsplit("/", 1)[-1] in resizes and len(saved) == len(model)
            and all(a <= b for a, b in zip(saved, model)))


def _resized(abstract_state: Any, saved: dict[str, tuple[int, ...]],
             resizes: tuple[str, ...]) -> Any:
    """`abstract_state` with the saved shapes of the leaves a method shrank."""
    def fix(path, x):
        p = path_str(path)
        if p in saved and saved[p] != tuple(x.shape) and _shrunk(p, saved[p], x.shape, resizes):
            return jax.ShapeDtypeStruct(saved[p], x.dtype, sharding=x.sharding)
        return x
    return jax.tree_util.tree_map_with_path(fix, abstract_state)


def _check_shapes(state: Any, abstract_state: Any) -> None:
    leaves, want = jax.tree.leaves(state), jax.tree.leaves(abstract_state)
    if len(leaves) != len(want):
        raise ValueError("restored state has a different number of arrays")
    for a, b in zip(leaves, want):
        if tuple(np.shape(a)) != tuple(b.shape):
            raise ValueError(f"restored array of shape {np.shape(a)} where {b.shape} was expected")


def restore_state_numpy(workdir: str, step: int | None = None) -> tuple[int, Any]:
    """(step, TrainState as a nested dict of numpy arrays) from `workdir`'s checkpoint at `step`
    (default: the latest), whatever mesh or process count wrote it. For analysis, warm starts
    and tests; training restores through Checkpointer with the run's shardings."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(
        directory) else []
    if not steps:
        raise ValueError(f"workdir={workdir!r} holds no checkpoint")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ValueError(f"workdir={workdir!r} has no checkpoint at step {step}; it has {steps}")
    return step, restore_numpy(os.path.join(directory, str(step), "state"))


def restore_numpy(path: str) -> Any:
    """The pytree saved at `path` (a checkpoint's state, or the params `sparsejax import-hf`
    wrote) as nested dicts of numpy arrays, whatever mesh wrote it."""
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(path)
        tree = getattr(meta, "item_metadata", meta).tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
