"""Stage bookkeeping for the long pipeline calls: a progress bar per stage, the memory held and the peak
at each, and handing freed memory back to the OS between stages."""
from __future__ import annotations

import logging
import resource
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def return_freed_memory() -> None:
    """Hand memory freed by Python and torch back to the OS (glibc keeps it otherwise, and the next
    stage's peak would stack on top of it); a no-op where there is no glibc."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 1024**2


def resident_memory_mb() -> float | None:
    """This process's resident memory now (Linux /proc), for the per-stage log; None elsewhere."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


class Progress:
    """A stage-level progress bar (tqdm on stderr) that tests and --quiet can switch off; each stage's
    end is logged with the memory held then and the peak so far (-v)."""

    def __init__(self, stages: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=stages, desc="prefix-export", unit="step", leave=False, file=sys.stderr)

    def note(self, description: str) -> None:
        log.info("%s: resident %.0f MB, peak %.0f MB", description, resident_memory_mb() or 0, peak_memory_mb())

    def __call__(self, description: str) -> None:
        self.note(description)
        if self.bar is not None:
            self.bar.set_description(description)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
