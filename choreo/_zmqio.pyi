"""Type stub of the compiled ``choreo._zmqio`` (choreo/_zmqio.pyx): the transport's reads and small sends."""

from collections.abc import Callable

import zmq

MULTIPART: bytes
READ_DRAINED: int
READ_BUDGET_SPENT: int
READ_YIELDED: int

def send(socket: zmq.Socket, frame: bytes) -> None: ...

class Reader:
    def __init__(
        self,
        socket: zmq.Socket,
        on_frame: Callable[[bytes, bytes, str | None], object],
        refuse: Callable[..., None],
        secure: bool,
    ) -> None: ...
    def waiting(self) -> bool: ...
    def read(self, budget: int) -> int: ...
