"""Orbax checkpoint args for the data iterator's position, via grain's own orbax handler.

Use inside the trainer's composite checkpoint::

    mngr.save(step, args=ocp.args.Composite(state=..., data=iterator_save_args(it)))
    mngr.restore(step, args=ocp.args.Composite(state=..., data=iterator_restore_args(it)))

grain's handler writes one JSON file per JAX process, named
``process_{jax.process_index()}-of-{jax.process_count()}.json`` inside the item
directory, so processes never overwrite each other's state; a restore must use
the same process count as the save.
"""
from __future__ import annotations

import grain
import orbax.checkpoint as ocp


def _check(it: grain.DatasetIterator) -> None:
    if not (hasattr(it, "get_state") and hasattr(it, "set_state")):
        raise ValueError(f"it must be a grain iterator with get_state/set_state, got {type(it).__name__}")


def iterator_save_args(it: grain.DatasetIterator) -> ocp.args.CheckpointArgs:
    """Orbax save args that record `it`'s current position (its `get_state()`)."""
    _check(it)
    return grain.checkpoint.CheckpointSave(it)


def iterator_restore_args(it: grain.DatasetIterator) -> ocp.args.CheckpointArgs:
    """Orbax restore args that move `it` (built with the same arguments) to the saved position."""
    _check(it)
    return grain.checkpoint.CheckpointRestore(it)
