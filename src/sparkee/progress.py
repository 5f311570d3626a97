"""Progress bars that suit where the output goes.

On a terminal: tqdm's bar. Anywhere else (a log file, CI, a pipe): no carriage-return frames, one
line when a stage starts and one when it ends, as pip and transformers write to logs.
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


def _is_tty(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class Progress(tqdm):
    """tqdm's interface (iterate, `update`, `set_postfix`, `with`); `enabled=False` prints nothing."""

    def __init__(self, iterable=None, *, desc: str = "", enabled: bool = True, file=None, **kwargs) -> None:
        stream = file if file is not None else sys.stderr
        self._lines = enabled and not _is_tty(stream)
        self._stream, self._label, self._t0, self._ended = stream, desc, time.perf_counter(), False
        super().__init__(iterable, desc=desc, disable=not enabled or self._lines, file=stream, **kwargs)
        if self._lines:
            total = kwargs.get("total")
            if total is None and iterable is not None and hasattr(iterable, "__len__"):
                total = len(iterable)
            size = f" ({total - kwargs.get('initial', 0)} to do)" if total is not None else ""
            print(f"{desc}: started{size}", file=stream, flush=True)

    def __iter__(self):
        yield from super().__iter__()
        self.close()

    def close(self) -> None:
        if self._lines and not self._ended:
            self._ended = True
            print(
                f"{self._label}: done in {time.perf_counter() - self._t0:.1f} s",
                file=self._stream,
                flush=True,
            )
        super().close()
