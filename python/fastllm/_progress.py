"""Optional progress reporting for fastllm's long host-side passes (predictor training and
quantization, threshold calibration, KV-head profiling).

Every such function takes ``progress``: ``True`` (always report), ``False`` (never) or ``None``
(the default: report only when stderr is a terminal, so logs, notebooks' captured output and CI
stay clean unless asked). Reports go to stderr: a tqdm bar when tqdm is installed, otherwise one
plain line per tenth of the work (rewritten in place on a terminal).
"""

from __future__ import annotations

import sys
import time


def check_progress(progress, where: str) -> bool:
    """``progress`` (True, False or None) resolved to whether to report, or a TypeError naming
    the argument and the function ``where``."""
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"{where}: progress must be True, False or None (only when stderr is a "
                        f"terminal), got {progress!r}")
    if progress is None:
        return _stderr_is_terminal()
    return progress


def _stderr_is_terminal() -> bool:
    stream = sys.stderr
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-like stream without isatty
        return False


def _tqdm():
    """tqdm's bar class, or None where tqdm is not installed (tests replace this)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm


class Progress:
    """A progress report of ``total`` steps named ``desc``; does nothing when not ``enabled``.

    Use as a context manager and call :meth:`update` per step done."""

    def __init__(self, total: int, desc: str, enabled: bool, unit: str = "step"):
        if isinstance(total, bool) or not isinstance(total, int) or total < 0:
            raise ValueError(f"fastllm: progress total must be an int >= 0, got {total!r}")
        self.total, self.desc, self.enabled, self.unit = total, desc, enabled, unit
        self.done = 0
        self._bar = None
        self._shown_tenth = -1
        self._start = time.perf_counter()
        if enabled:
            bar = _tqdm()
            if bar is not None:
                self._bar = bar(total=total, desc=desc, unit=unit, file=sys.stderr)
            else:
                self._line()

    def update(self, n: int = 1) -> None:
        if not self.enabled:
            return
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        else:
            self._line()

    def _line(self, final: bool = False) -> None:
        tenth = 10 * self.done // self.total if self.total else 10
        if tenth == self._shown_tenth and not final:
            return
        self._shown_tenth = tenth
        text = (f"{self.desc}: {self.done}/{self.total} {_plural(self.unit)} "
                f"({time.perf_counter() - self._start:.1f} s)")
        if _stderr_is_terminal():
            sys.stderr.write("\r" + text + ("\n" if final else ""))
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif _stderr_is_terminal():
            self._line(final=True)
        self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("ch", "sh", "s", "x")) else "s")


def track(iterable, total: int, desc: str, enabled: bool, unit: str = "step"):
    """Iterate ``iterable`` (``total`` items), reporting each item done."""
    with Progress(total, desc, enabled, unit) as bar:
        for item in iterable:
            yield item
            bar.update()
