"""choreo's benchmarks (pytest-benchmark). ``make bench`` runs them and rebuilds the README table."""
