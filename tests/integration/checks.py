"""Assertions over recorded deliveries, with failure messages that say what went wrong."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable


def check_exactly_once_in_order(
    records: Iterable[tuple[str, str, int, str]], expected: dict[str, list[int]], what: str
) -> None:
    """Every expected (key, n) handled exactly once, and per key in increasing n.

    ``expected`` maps a key to its ns in emission order; records are (type, key, n, file).
    """
    seen: dict[str, list[int]] = defaultdict(list)
    files: dict[str, set[str]] = defaultdict(set)
    for _type, key, n, file in records:
        seen[key].append(n)
        files[key].add(file)
    missing, duplicated, disordered = [], [], []
    for key, ns in expected.items():
        got = seen.get(key, [])
        counts = Counter(got)
        missing.extend(f"{key}:{n}" for n in ns if counts[n] == 0)
        duplicated.extend(f"{key}:{n}x{c}" for n, c in counts.items() if c > 1)
        if got != sorted(got):
            disordered.append(key)
    unexpected = sorted(set(seen) - set(expected))
    total = sum(len(v) for v in expected.values())
    got_total = sum(len(v) for v in seen.values())
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[:5]})")
    if duplicated:
        problems.append(f"{len(duplicated)} handled more than once (e.g. {duplicated[:5]})")
    if disordered:
        problems.append(f"{len(disordered)} keys out of order (e.g. {disordered[:5]})")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:5]}")
    assert not problems, f"{what}: expected {total} deliveries, got {got_total}: " + "; ".join(problems)


def expected_stream(count: int, keys: int) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for n in range(count):
        out[f"k{n % keys}"].append(n)
    return dict(out)
