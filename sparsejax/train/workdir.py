"""A run's working directory: checked before anything is built, its saved config, and the
outputs of an earlier run that a fresh start moves aside.

    WORKDIR/config.gin      the operative config (every value the run used), written at start
    WORKDIR/pretrained/     params of an imported model (`sparsejax import-hf`)
    WORKDIR/pretrained.gin  the bindings that rebuild the imported architecture and tokenizer
    WORKDIR/metrics.jsonl   one JSON object per logged step
    WORKDIR/checkpoints/    orbax checkpoints (TrainState, data position, config bindings)
    WORKDIR/previous.N/     metrics and TensorBoard logs of an earlier run that restarted
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile

log = logging.getLogger(__name__)

CONFIG_FILE = "config.gin"
METRICS_FILE = "metrics.jsonl"
PRETRAINED_DIR = "pretrained"
PRETRAINED_CONFIG = "pretrained.gin"
_ASIDE = (METRICS_FILE, "tensorboard", "loss.png", "density.png", "expert_load.png")


def prepare(workdir: str) -> None:
    """Creates `workdir` and checks it is a writable directory (one-line ValueErrors)."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir={workdir!r} is an existing file, not a directory; give a "
                         f"directory path")
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"--workdir={workdir!r} is not writable ({e.strerror or e}); give a "
                         f"directory you can write to") from None


def has_checkpoint(workdir: str) -> bool:
    ckpts = os.path.join(workdir, "checkpoints")
    return os.path.isdir(ckpts) and any(d.isdigit() for d in os.listdir(ckpts))


def has_pretrained(workdir: str) -> bool:
    return os.path.isdir(os.path.join(workdir, PRETRAINED_DIR))


def saved_config(workdir: str) -> str | None:
    """The config a command on `workdir` starts from: config.gin when the workdir holds a run
    (a checkpoint), else pretrained.gin when it holds an imported model, else None. (The
    config.gin of a run that died before its first checkpoint is not used: that run is
    restarted from scratch with the config given now.)"""
    for path, present in ((os.path.join(workdir, CONFIG_FILE), has_checkpoint(workdir)),
                          (os.path.join(workdir, PRETRAINED_CONFIG), has_pretrained(workdir))):
        if present and os.path.isfile(path):
            return path
    return None


def write_config(workdir: str, text: str) -> None:
    """Writes config.gin atomically (a crash never leaves half a config)."""
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def move_aside_previous_run(workdir: str) -> str | None:
    """A run starting from step 0 in a workdir with an earlier run's metrics moves them (and
    its TensorBoard logs and plots) into previous.N/, so old and new records never mix.
    Returns the directory they went to, or None."""
    present = [n for n in _ASIDE if os.path.exists(os.path.join(workdir, n))]
    if METRICS_FILE not in present:
        return None
    n = 1
    while os.path.exists(os.path.join(workdir, f"previous.{n}")):
        n += 1
    dest = os.path.join(workdir, f"previous.{n}")
    os.makedirs(dest)
    for name in present:
        shutil.move(os.path.join(workdir, name), os.path.join(dest, name))
    log.warning("starting from step 0 in %s, which holds an earlier run's metrics: moved them "
                "to %s", workdir, dest)
    return dest
