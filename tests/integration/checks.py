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


def check_moves(
    records: Iterable[tuple[str, int, int, str]],
    expected: dict[str, list[int]],
    what: str,
    crashed: str | Iterable[str] = (),
    max_duplicates: int = 0,
    ordered: bool = True,
    crashed_lives: Iterable[tuple[int, int]] = (),
) -> int:
    """Deliveries across instances that came and went. Returns how many were duplicates.

    ``crashed``: the record file (or files) of instances killed, or frozen past ``dead_after``.
    ``ordered=False``: the messages were sent concurrently, in no order to check.
    ``crashed_lives``: (started, crashed) times of the crashed instances (``time_ns``).

    * every expected (key, n) was handled;
    * each instance handled each key's events in increasing order;
    * merged by time, a key's events are in increasing order, a message that a crashed
      instance handled too counting at its first handling only: what a crashed instance
      handled and had not seen acknowledged runs again elsewhere (the crash window), which with
      acks end to end need not be a tail of what it handled (an earlier message whose outputs
      waited for a receiver that died too runs again after later ones that were acknowledged);
      and a handler an instance was frozen in finishes as it wakes, after the message's next
      owner ran it and later ones (README, a node frozen too long);
    * of the handlings of a duplicate, all but one were by crashed instances, or a crashed
      instance lived between them (the partition's dedup ids may have gone to it with the
      partition, and died with it: README, a crash); at most ``max_duplicates`` in all.
    """
    lives = list(crashed_lives)
    crashed_files = {crashed} if isinstance(crashed, str) else set(crashed)
    by_key: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
    for key, n, t, file in records:
        by_key[key].append((t, n, file))
    missing, disordered, bad_dups = [], [], []
    duplicates = 0
    for key, ns in expected.items():
        events = sorted(by_key.get(key, []))
        counts = Counter(n for _, n, _ in events)
        missing.extend(f"{key}:{n}" for n in ns if counts[n] == 0)
        # a message a crashed instance handled too counts at its first handling only, by each
        # instance and merged by time
        crash_window = {n for _, n, file in events if counts[n] > 1 and file in crashed_files}
        merged, first = [], set()
        for t, n, file in events:
            if n not in crash_window or n not in first:
                merged.append((t, n, file))
                first.add(n)
        per_file: dict[str, list[int]] = defaultdict(list)
        for _, n, file in merged:
            per_file[file].append(n)
        for file, seq in per_file.items():
            if ordered and any(b <= a for a, b in zip(seq, seq[1:])):
                disordered.append(f"{key} in {file}")
        for (ta, a, fa), (tb, b, fb) in zip(merged, merged[1:]) if ordered else ():
            if b <= a:  # (the first such pair, with who handled it when: what a failure must show)
                disordered.append(f"{key} merged by time: {a} by {fa}, then {b} by {fb} {(tb - ta) / 1e9:.6f} s later"
                                  f" ({a} handled {counts[a]}x, {b} {counts[b]}x)")
                break
        for n, c in counts.items():
            if c > 1:
                duplicates += c - 1
                handled = [(t, file) for t, m, file in events if m == n]
                handled_by = [file for _, file in handled]
                between = any(born < handled[-1][0] and fell > handled[0][0] for born, fell in lives)
                if sum(file not in crashed_files for file in handled_by) > 1 and not between:
                    bad_dups.append(f"{key}:{n}x{c} by {handled_by}")
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[:5]})")
    if disordered:
        problems.append(f"{len(disordered)} out of order (e.g. {disordered[:5]})")
    if bad_dups:
        problems.append(f"{len(bad_dups)} duplicates not explained by a crash (e.g. {bad_dups[:5]})")
    if duplicates > max_duplicates:
        problems.append(f"{duplicates} duplicates, more than the {max_duplicates} allowed")
    assert not problems, f"{what}: " + "; ".join(problems)
    return duplicates
