"""Audit of where the tensors handed to collectives come from, for tests on CPU-only machines.

On a CPU run with gloo, a tensor that a CUDA run would leave on the host looks exactly like every
other tensor: its device is ``cpu`` either way. What distinguishes it is how it was made. So, while
`CollectiveAudit` is active:

- a `torch.overrides.TorchFunctionMode` tags every tensor made by a factory call without an explicit
  ``device=`` (``torch.zeros(4)``: on CUDA it would sit on the host) and every host copy
  (``Tensor.cpu()``); a result of other operations is tagged when all its tensor inputs are, and
  ``Tensor.to(device)`` clears the tag (that is placing a tensor on purpose);
- every collective of ``torch.distributed`` that takes tensors is wrapped: it records the op, the
  tensor's device and the group's communication device (``diffmoe_dist.parallel.groups.comm_device``:
  CUDA for NCCL, the host for gloo), notes a tagged tensor or a device
  mismatch with the place the tensor was made, and runs the real collective.

The collectives are the real ones (gloo, several processes); the wrappers only look.
"""

from __future__ import annotations

import functools
import os
import sys

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

FACTORIES = {
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.tensor,
    torch.arange,
    torch.linspace,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.randperm,
}
TENSOR_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",  # torch 2.13's name of all_gather_into_tensor (the selection's tie counts)
    "reduce_scatter_tensor",
    "all_to_all_single",
    "broadcast",
    "reduce",
)
OBJECT_COLLECTIVES = ("all_gather_object", "gather_object", "broadcast_object_list")
_TAG = "_device_audit_origin"
_PACKAGE = os.sep + "diffmoe_dist" + os.sep


def _site() -> str:
    """The innermost caller inside the package (file:line), else the innermost outside this file."""
    frame = sys._getframe(2)
    fallback = None
    while frame is not None:
        path = frame.f_code.co_filename
        if _PACKAGE in path:
            return f"{path.split(_PACKAGE, 1)[1]}:{frame.f_lineno}"
        if fallback is None and not path.endswith(("device_audit.py", "overrides.py")):
            fallback = f"{os.path.basename(path)}:{frame.f_lineno}"
        frame = frame.f_back
    return fallback or "?"


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


class PlacementTracker(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            return out
        if func in FACTORIES:
            if kwargs.get("device") is None:
                setattr(out, _TAG, f"{func.__name__}() without device= at {_site()}")
        elif func is torch.Tensor.cpu:
            setattr(out, _TAG, f"Tensor.cpu() at {_site()}")
        elif func is torch.Tensor.to:
            if hasattr(out, _TAG) and (kwargs.get("device") is not None or _has_device_arg(args[1:])):
                delattr(out, _TAG)
        else:
            inputs = list(_tensors((args, kwargs)))
            if inputs and all(hasattr(t, _TAG) for t in inputs) and not hasattr(out, _TAG):
                setattr(out, _TAG, getattr(inputs[0], _TAG))
        return out


def _has_device_arg(args) -> bool:
    return any(isinstance(a, (str, torch.device)) for a in args)


class CollectiveAudit:
    """``with CollectiveAudit() as audit: ...``; ``audit.records``: one dict per collective call;
    ``audit.errors``: the distinct misplacements seen (the calls still run: gloo takes host tensors)."""

    def __init__(self):
        self.records: list[dict] = []
        self.errors: list[str] = []
        self._saved: dict[str, object] = {}
        self._mode = PlacementTracker()

    def _wrap(self, name: str, real):
        from diffmoe_dist.parallel.groups import comm_device

        @functools.wraps(real)
        def wrapper(*args, **kwargs):
            group = kwargs.get("group")
            tensors = list(_tensors((args[:2], kwargs.get("tensor"), kwargs.get("output"))))
            expected = comm_device(group)
            for t in tensors:
                record = {"op": name, "device": str(t.device), "expected": str(expected), "site": _site()}
                self.records.append(record)
                problem = None
                if t.device != expected:
                    problem = f"on {t.device}, but the group communicates on {expected}"
                elif hasattr(t, _TAG):
                    problem = f"made by {getattr(t, _TAG)}: on a CUDA run it would be on the host, not on {expected}"
                if problem:  # collected, not raised: gloo runs it anyway, and the test lists them all
                    message = f"dist.{name} at {record['site']}: a tensor {problem}"
                    if message not in self.errors:
                        self.errors.append(message)
            return real(*args, **kwargs)

        return wrapper

    def _wrap_object(self, name: str, real):
        @functools.wraps(real)
        def wrapper(*args, **kwargs):
            # Object collectives pickle into tensors torch places itself (the current CUDA device on NCCL).
            self.records.append({"op": name, "device": "object", "expected": "object", "site": _site()})
            return real(*args, **kwargs)

        return wrapper

    def __enter__(self) -> CollectiveAudit:
        for name in TENSOR_COLLECTIVES:
            self._saved[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(name, self._saved[name]))
        for name in OBJECT_COLLECTIVES:
            self._saved[name] = getattr(dist, name)
            setattr(dist, name, self._wrap_object(name, self._saved[name]))
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        for name, real in self._saved.items():
            setattr(dist, name, real)

    def ops(self) -> set[str]:
        return {r["op"] for r in self.records}
