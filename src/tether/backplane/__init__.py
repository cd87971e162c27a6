"""Backplanes: where messages get their seq, are kept for resume, and reach every node."""

from tether.backplane.base import Backplane, Deliver
from tether.backplane.memory import MemoryBackplane

__all__ = ["Backplane", "Deliver", "MemoryBackplane"]
