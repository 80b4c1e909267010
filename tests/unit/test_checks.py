"""The checker the fault tests judge real runs by (tests/integration/checks.py): what it lets
through is what the README promises, and nothing more."""

from __future__ import annotations

import pytest

from tests.integration.checks import check_moves

EXPECTED = {"k": [1, 2, 3, 4]}


def records(*handlings: tuple[int, int, str]) -> list[tuple[str, int, int, str]]:
    """(n, time, file) -> the recorded (key, n, time, file) of key ``k``."""
    return [("k", n, t, file) for n, t, file in handlings]


def test_one_instance_in_order_passes() -> None:
    assert check_moves(records((1, 1, "a"), (2, 2, "a"), (3, 3, "a"), (4, 4, "a")), EXPECTED, "run") == 0


def test_a_crashed_instance_s_tail_handled_again_elsewhere_is_the_crash_window() -> None:
    handled = records((1, 1, "a"), (2, 2, "a"), (3, 3, "a"), (2, 4, "b"), (3, 5, "b"), (4, 6, "b"))
    assert check_moves(handled, EXPECTED, "run", crashed="a", max_duplicates=2) == 2
    with pytest.raises(AssertionError, match="2 duplicates, more than the 1 allowed"):
        check_moves(handled, EXPECTED, "run", crashed="a", max_duplicates=1)
    with pytest.raises(AssertionError, match="not explained by a crash"):
        check_moves(handled, EXPECTED, "run", max_duplicates=2)  # nobody crashed


def test_a_handler_an_instance_was_frozen_in_may_finish_after_later_events_ran_elsewhere() -> None:
    # a handled 1 and was frozen inside 2's handler; b ran 2, 3 and 4; a woke and finished 2
    handled = records((1, 1, "a"), (2, 2, "b"), (3, 3, "b"), (4, 4, "b"), (2, 5, "a"))
    assert check_moves(handled, EXPECTED, "run", crashed="a", max_duplicates=1) == 1
    with pytest.raises(AssertionError, match="merged by time: 4 by b, then 2 by a"):
        check_moves(handled, EXPECTED, "run", max_duplicates=1)  # a was not frozen: out of order


def test_what_a_crashed_instance_runs_again_need_not_be_a_tail() -> None:
    # a ran 1 (its outputs waiting for a receiver that died) and 2 (acknowledged), then crashed;
    # 1 was sent again to b, which ran it after 2
    handled = records((1, 1, "a"), (2, 2, "a"), (1, 3, "b"), (3, 4, "b"), (4, 5, "b"))
    assert check_moves(handled, EXPECTED, "run", crashed="a", max_duplicates=1) == 1
    with pytest.raises(AssertionError, match="merged by time: 2 by a, then 1 by b"):
        check_moves(handled, EXPECTED, "run", max_duplicates=1)


def test_a_survivor_may_run_again_an_old_message_a_crashed_instance_ran_after_later_ones() -> None:
    # a ran 2 and died before its ack came back; b ran 3 and 4, then 2 came to it again
    handled = records((1, 1, "b"), (2, 2, "a"), (3, 3, "b"), (4, 4, "b"), (2, 5, "b"))
    assert check_moves(handled, EXPECTED, "run", crashed="a", max_duplicates=1) == 1
    with pytest.raises(AssertionError, match="k in b"):
        check_moves(handled, EXPECTED, "run", max_duplicates=1)


def test_one_instance_may_run_a_message_twice_only_if_a_crashed_instance_lived_in_between() -> None:
    # b ran 2, its partition (and dedup ids) went to c, which died; back at b, 2 came again
    handled = records((1, 1, "b"), (2, 2, "b"), (3, 3, "b"), (2, 6, "b"), (4, 7, "b"))
    with pytest.raises(AssertionError, match="not explained by a crash"):
        check_moves(handled, EXPECTED, "run", crashed="c", max_duplicates=1, ordered=False)
    with pytest.raises(AssertionError, match="not explained by a crash"):  # c had died before b ran 2
        check_moves(handled, EXPECTED, "run", crashed="c", max_duplicates=1, ordered=False, crashed_lives=[(0, 1)])
    assert check_moves(handled, EXPECTED, "run", crashed="c", max_duplicates=1, ordered=False,
                       crashed_lives=[(3, 5)]) == 1


def test_out_of_order_missing_and_unexplained_duplicates_fail() -> None:
    with pytest.raises(AssertionError, match="k in a"):
        check_moves(records((1, 1, "a"), (3, 2, "a"), (2, 3, "a"), (4, 4, "a")), EXPECTED, "run")
    with pytest.raises(AssertionError, match=r"1 missing \(e.g. \['k:3'\]\)"):
        check_moves(records((1, 1, "a"), (2, 2, "a"), (4, 4, "a")), EXPECTED, "run")
    with pytest.raises(AssertionError, match="merged by time: 3 by b, then 2 by a"):
        # a crashed instance's handling that nobody repeated still counts for the order
        check_moves(records((1, 1, "a"), (3, 2, "b"), (2, 3, "a"), (4, 4, "b")), EXPECTED, "run", crashed="a")


def test_unordered_messages_are_checked_for_loss_and_duplicates_only() -> None:
    handled = records((2, 1, "a"), (1, 2, "a"), (4, 3, "b"), (3, 4, "b"))
    assert check_moves(handled, EXPECTED, "run", ordered=False) == 0
    with pytest.raises(AssertionError, match="not explained by a crash"):
        check_moves(handled + records((3, 5, "a")), EXPECTED, "run", ordered=False, max_duplicates=1)
