"""Weight offload: blocks kept in the store and streamed to the device just in time."""

from strata.offload.blocks import OffloadError, find_blocks
from strata.offload.handle import OffloadHandle, handle_of, offload

__all__ = ["OffloadError", "OffloadHandle", "find_blocks", "handle_of", "offload"]
