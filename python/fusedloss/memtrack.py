"""Peak memory of tensors created inside a block, on any device, without a profiler.

``PeakMemory`` is a ``TorchDispatchMode``: every op's output storage is counted
when it first appears and uncounted when it is freed (a finalizer on the storage,
whose Python object PyTorch keeps alive exactly as long as the storage). Tensors
alive before the block (the inputs) are not counted, so ``peak_bytes`` is the
peak *extra* memory a computation needs, e.g. a loss's forward+backward.

It sees what runs through the dispatcher: autograd's buffers, every op's output,
and the temporaries inside fusedloss ops implemented in Python (the reference),
which it steps into; not memory a C++ kernel allocates privately (for our C++
kernels, that is only their outputs, which it does count).
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch._library.custom_ops import _maybe_get_opdef
from torch.utils._pytree import tree_flatten


class PeakMemory(TorchDispatchMode):
    """``with PeakMemory() as m: loss.backward()`` then ``m.peak_bytes``, ``m.current_bytes``."""

    def __init__(self) -> None:
        super().__init__()
        self.current_bytes = 0
        self.peak_bytes = 0
        self._seen: set[int] = set()
        self._preexisting: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {id(s) for s in _storages((args, kwargs or {}))}
        opdef = _maybe_get_opdef(func._schema.name) if func.namespace == "fusedloss" else None
        if opdef is not None and opdef._init_fn is not None:
            # A Python-implemented op: run its body under this mode so its temporaries count.
            with self:
                out = opdef._init_fn(*args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
        for storage in _storages(out):
            key = id(storage)
            if key in self._seen or key in inputs:
                continue  # views and in-place results share an input's storage
            self._seen.add(key)
            nbytes = storage.nbytes()
            self.current_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
            weakref.finalize(storage, self._free, key, nbytes)
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.current_bytes -= nbytes


def _storages(tree) -> list[torch.UntypedStorage]:
    leaves, _ = tree_flatten(tree)
    return [t.untyped_storage() for t in leaves if isinstance(t, torch.Tensor) and t.device.type != "meta"]
