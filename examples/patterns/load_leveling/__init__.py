"""Queue-based load leveling: a burst goes into a queue, the worker takes it at its own pace.

    choreo up examples/patterns/load_leveling
"""

from .uploads import drive

SYSTEM = {"thumbnailer": 1}
CLIENT = "uploads"
