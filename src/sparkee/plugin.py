"""Loading a plug-in named by a `module:attribute` import path (eval's vocoders, judges and ASR,
verified mode's unit distances). A leaf: the plug-in's own module is imported only when it is asked
for, so naming a built-in by its path keeps the floors of the house one way."""

from __future__ import annotations

import importlib

from .errors import SparkeeError


def load_plugin(spec: str, kind: str):
    """Import `module:attribute`; instantiate it when it is a class."""
    if ":" not in spec:
        raise SparkeeError(f"{kind} plug-in '{spec}' is neither a built-in name nor a module:attribute path")
    mod_name, attr = spec.split(":", 1)
    try:
        obj = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise SparkeeError(f"cannot import {kind} plug-in '{spec}': {e}") from None
    return obj() if isinstance(obj, type) else obj
