"""Small importable systems for the analyzer tests (``choreo graph analyzer_systems.shop``)."""
