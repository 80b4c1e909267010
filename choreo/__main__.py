"""``python -m choreo``: the same command line as the ``choreo`` script (see :mod:`choreo.cli`)."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
