"""`skip_meta_init()`: while a model is built on the meta device, `torch.nn.init`'s functions leave
meta tensors as they are.

A meta tensor holds no values, yet `nn.Linear` and `nn.Embedding` still run their initializers on it
(`reset_parameters`), and on meta each goes through torch's Python decompositions and prims: ~40 ms
of the embedded model's warm start, which builds its `Transformer` on meta twice before mapping the
cached weights in with `assign=True`. Only meta tensors are skipped: a tensor on a real device
(built inside the block on purpose) is still initialized. This module is *not* a loader.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["skip_meta_init"]

# the in-place initializers (`kaiming_uniform_`, `normal_`, `ones_`, ...): the first argument is the tensor
_INITIALIZERS: frozenset[Callable[..., Any]] = frozenset(
    f for name, f in vars(torch.nn.init).items() if name.endswith("_") and not name.startswith("_") and callable(f)
)


class skip_meta_init(TorchFunctionMode):  # noqa: N801 - used as a context manager, like torch.device
    """``with torch.device("meta"), skip_meta_init(): model = Transformer(args)``"""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's signature
        kwargs = kwargs or {}
        if func in _INITIALIZERS:
            tensor = args[0] if args else kwargs.get("tensor")
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)
