"""A small JSON cache store for what sparkee measures on a machine (calibrations, kernel choices).

Each file is keyed by a dict of everything the measurement depends on (machine, model shape,
dtype, device, torch version, ...); a file whose key does not match the reader's is never used.
Files live under `SPARKEE_CACHE` (default ~/.cache/sparkee), one folder per kind, written
atomically. Used by calibrate.py and kernels.py; imports nothing of sparkee.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import torch


def file_digest(path: str | Path) -> str:
    """A file's content hash (16 hex digits of its SHA-256): what manifests record of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("SPARKEE_CACHE") or Path.home() / ".cache" / "sparkee")


# environment variables that cap the instruction set a CPU library uses (the same CPU then runs
# other kernels, so its timings and kernel choices are another machine's)
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def machine_id() -> str:
    """CPU model (or GPU name), logical cores, torch threads and the instruction set torch's
    kernels use (with any library's cap on it): what makes timings comparable."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    isa = torch.backends.cpu.get_cpu_capability()
    caps = "".join(f" {k}={os.environ[k]}" for k in ISA_LIMITS if os.environ.get(k))
    return f"{cpu} | {os.cpu_count()} cpus | {torch.get_num_threads()} threads | {isa}{caps}"


def key_path(kind: str, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / kind / f"{digest}.json"


def read_cached(kind: str, key: dict) -> dict | None:
    """The cached JSON for `key`, or None when there is none or it was made under other settings."""
    p = key_path(kind, key)
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key:
        return None  # stale or foreign: never reused
    return data


def write_cached(kind: str, key: dict, data: dict) -> Path:
    p = key_path(kind, key)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps({**data, "key": key}, indent=1))
    tmp.replace(p)  # atomic: a reader never sees half a file
    return p
