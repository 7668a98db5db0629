"""Import the task function by its ``module:callable`` reference: in the worker, and in each
process-mode child, which imports it again by the same reference."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def load_function(ref: str) -> Callable[..., Any]:
    """Import ``module:callable``; raises ``ImportError`` with a readable message."""
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ImportError(f"cannot import module {module_name!r}: {exc.__class__.__name__}: {exc}") from exc
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ImportError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(target):
        raise ImportError(f"{ref} is not callable")
    return target  # type: ignore[no-any-return]
