"""Type stub of the compiled ``choreo._clock`` (choreo/_clock.pyx): the lanes' C clock."""

from typing import Any

MONOTONIC: Any  # a PyCapsule named "choreo.clock" holding ``double (*)(void)``

def monotonic() -> float: ...
