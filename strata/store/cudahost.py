"""Page-lock memory the process already maps (``cudaHostRegister``), so host-to-device copies
from it run at pinned speed and can be asynchronous.

The CXL tier registers its mapping this way. Never raises: without CUDA, or where the
driver refuses (some DAX and file mappings, a locked-memory limit), the memory stays
pageable and the reason says why (the caller logs it once and reports it in stats).
"""

from __future__ import annotations

import torch

REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context of the process


def _cudart():
    return torch.cuda.cudart()


def register(address: int, length: int) -> tuple[bool, str]:
    """(registered, reason) for ``[address, address + length)``."""
    if not torch.cuda.is_available():
        return False, "no CUDA device: host-to-device copies are not needed"
    try:
        err = _cudart().cudaHostRegister(address, length, REGISTER_PORTABLE)
    except (AttributeError, RuntimeError) as e:
        return False, f"cudaHostRegister is not available ({e})"
    code = int(getattr(err, "value", err))
    if code != 0:
        return False, f"cudaHostRegister refused the mapping (cudaError {code}); copies to the GPU stay pageable"
    return True, "registered with CUDA (cudaHostRegister): copies to the GPU run at pinned speed"


def unregister(address: int) -> None:
    try:
        _cudart().cudaHostUnregister(address)
    except (AttributeError, RuntimeError):
        pass
