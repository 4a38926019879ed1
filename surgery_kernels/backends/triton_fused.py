"""Backend ``triton``: fused Triton kernels (not implemented yet)."""

from . import Availability


def availability(name: str, device_type: str) -> Availability:
    return Availability(False, "the Triton kernels are not implemented yet")
