"""Weight offload: blocks kept in the store and streamed to the device just in time."""

from strata.errors import OffloadError
from strata.offload.blocks import find_blocks
from strata.offload.handle import OffloadHandle, handle_of, offload

__all__ = ["OffloadError", "OffloadHandle", "find_blocks", "handle_of", "offload"]
