"""Refusing to build what cannot fit, before allocating anything.

    need = 1.2 * (sum_c n_c * b + max_c n_c * max(0, 4 - b))

where n_c is the parameter count of component c (counted on the meta device), b the bytes per
element of the target dtype, and the second term the one component that briefly exists in fp32
while a random build is cast down. The 1.2 covers buffers and allocator slack. `need` is checked
against the device's free memory: torch.cuda.mem_get_info for CUDA, MemAvailable in
/proc/meminfo for the CPU. Where neither is known (another OS, another accelerator) the check is
skipped with a warning.

Offers: free_bytes, bytes_needed, check_fits.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from models.errors import FadelabError

log = logging.getLogger(__name__)

OVERHEAD = 1.2
GiB = 2**30


def free_bytes(device: torch.device) -> int | None:
    """Free memory on `device` in bytes, or None where it cannot be read."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # reported in kB
        except OSError:
            return None
    return None


def bytes_needed(counts: dict[str, int], dtype: torch.dtype) -> int:
    """The module doc's `need` for per-component parameter counts in `dtype`."""
    b = dtype.itemsize
    largest = max(counts.values(), default=0)
    return int(OVERHEAD * (sum(counts.values()) * b + largest * max(0, 4 - b)))


def check_fits(counts: dict[str, int], dtype: torch.dtype, device: torch.device, what: str) -> None:
    """Raise FadelabError, suggesting scale=, when `what` would not fit in `device`'s free memory."""
    need = bytes_needed(counts, dtype)
    free = free_bytes(device)
    if free is None:
        log.warning("cannot read free memory on %s; building %s (about %.1f GiB) unchecked", device, what, need / GiB)
        return
    if need > free:
        n = sum(counts.values())
        raise FadelabError(
            f"{what} needs about {need / GiB:.1f} GiB ({n / 1e9:.2f}B parameters in {dtype}) but {device} has "
            f"{free / GiB:.1f} GiB free; pass scale= (e.g. scale=0.125) for a narrower copy with the same "
            "structure, a smaller dtype, or another device"
        )
