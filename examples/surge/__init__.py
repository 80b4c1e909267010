"""Surge: ingestion outgrows one consumer; backpressure reaches the producer, lag stays bounded,
a second consumer brings it down.

The article's scaling story. The gateway ramps its click rate past one processor's capacity.
choreo gives every channel a credit window: once that many clicks are in flight to a processor,
``emit`` waits, so the overload reaches the producer instead of growing a queue; the processor's
lag (clicks received and not yet handled, reported per partition) rises to the window and stays
there. Mid-surge a second processor starts; partitions move to it and the lag comes down.

    choreo up examples/surge
    choreo up examples/surge -o surge=900
"""

from choreo import NodeConfig

from .gateway import WINDOW, drive

SYSTEM = {"processor": 1}
CLIENT = "gateway"
CLIENT_CONFIG = NodeConfig(window=WINDOW)

__all__ = ["SYSTEM", "CLIENT", "CLIENT_CONFIG", "drive"]
