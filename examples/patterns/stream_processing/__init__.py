"""Stream processing: a windowed aggregate over a stream of readings, computed as they arrive.

    choreo up examples/patterns/stream_processing
"""

from .sensors import drive

SYSTEM = {"aggregator": 2, "monitor": 1}
CLIENT = "sensors"
