"""Lazy reading and sharded writing of safetensors checkpoints (numpy API; no torch).

`SafetensorsCheckpoint(dir)` indexes `model.safetensors` or the shards listed in
`model.safetensors.index.json` without reading any tensor; `read(name, index)` memory-maps
the file and copies out only the requested slice, so a process loads just what its devices
hold. `write_safetensors` writes a dict of numpy arrays, sharded above a size, with an index.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Mapping

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

SUPPORTED_DTYPES = ("F32", "F16", "BF16")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class SafetensorsCheckpoint:
    """Tensor names, shapes and dtypes of a checkpoint directory; slices read on demand."""

    def __init__(self, directory: str, dtypes: tuple[str, ...] = SUPPORTED_DTYPES):
        """`dtypes`: the tensor dtypes accepted (others are refused by name)."""
        self._safe_open = safe_open
        self.directory = directory
        index_path = os.path.join(directory, INDEX_FILE)
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index_path} has no 'weight_map'")
            files = sorted(set(weight_map.values()))
        elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
            files, weight_map = [SINGLE_FILE], None
        else:
            raise ValueError(f"--src={directory!r} holds neither {SINGLE_FILE} nor {INDEX_FILE}")
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self._file_of: dict[str, str] = {}
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.exists(path):
                raise ValueError(f"safetensors shard {path} (listed in {INDEX_FILE}) is missing")
            with safe_open(path, framework="np") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    self.shapes[key] = tuple(int(d) for d in sl.get_shape())
                    self.dtypes[key] = sl.get_dtype()
                    self._file_of[key] = path
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.shapes))
            if missing:
                raise ValueError(f"{INDEX_FILE} lists tensors no shard holds: {missing[:5]}")
        bad = {k: d for k, d in self.dtypes.items() if d not in dtypes}
        if bad:
            name, dtype = next(iter(bad.items()))
            raise ValueError(f"tensor {name} has dtype {dtype}; supported: {dtypes}")
        self._handles: dict[str, object] = {}

    @property
    def names(self) -> list[str]:
        return sorted(self.shapes)

    def nbytes(self) -> int:
        size = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1}
        return sum(int(np.prod(s)) * size[self.dtypes[k]] for k, s in self.shapes.items())

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """The slice `index` (a tuple of slices, one per dim) of tensor `name` as numpy."""
        path = self._file_of[name]
        handle = self._handles.get(path)
        if handle is None:
            handle = self._safe_open(path, framework="np").__enter__()
            self._handles[path] = handle
        sl = handle.get_slice(name)
        if index is None:
            index = tuple(slice(None) for _ in self.shapes[name])
        return np.asarray(sl[index])

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()


def write_safetensors(tensors: Mapping[str, np.ndarray], directory: str,
                      max_shard_bytes: int = 5 * 2**30,
                      metadata: Mapping[str, str] | None = None) -> list[str]:
    """Writes `tensors` as model.safetensors, or as model-0000i-of-0000n.safetensors shards
    plus an index when they exceed `max_shard_bytes`. Returns the files written."""
    os.makedirs(directory, exist_ok=True)
    groups: list[list[str]] = [[]]
    size = 0
    for name in tensors:
        n = tensors[name].nbytes
        if groups[-1] and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    meta = {"format": "np", **(metadata or {})}
    if len(groups) == 1:
        save_file({k: np.ascontiguousarray(tensors[k]) for k in groups[0]},
                  os.path.join(directory, SINGLE_FILE), metadata=meta)
        return [SINGLE_FILE]
    files, weight_map = [], {}
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: np.ascontiguousarray(tensors[k]) for k in names},
                  os.path.join(directory, fname), metadata=meta)
        files.append(fname)
        weight_map.update({k: fname for k in names})
    total = sum(int(t.nbytes) for t in tensors.values())
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files + [INDEX_FILE]


def expect_names(have: Iterable[str], want: Iterable[str], src: str) -> None:
    """ValueError naming missing or unexpected tensors."""
    have, want = set(have), set(want)
    missing, extra = sorted(want - have), sorted(have - want)
    if missing:
        raise ValueError(f"checkpoint {src} is missing tensors {missing[:5]}"
                         f"{' (and %d more)' % (len(missing) - 5) if len(missing) > 5 else ''}")
    if extra:
        raise ValueError(f"checkpoint {src} has unexpected tensors {extra[:5]}"
                         f"{' (and %d more)' % (len(extra) - 5) if len(extra) > 5 else ''}; "
                         f"config.json does not describe them")
