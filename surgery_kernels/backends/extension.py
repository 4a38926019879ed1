"""Backends ``cpu`` and ``cuda``: the C++/CUDA extension in ``csrc/`` (not built yet)."""

from . import Availability


def availability(name: str, device_type: str) -> Availability:
    return Availability(False, "the C++/CUDA extension is not implemented yet")
