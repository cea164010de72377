"""Rows the IB filter dropped are left out of the actor update (iib_lpo.advantage.dropped_rows=remove).

``update_row_indices`` picks the rows that go to verl's update; ``_PinnedExtraInfo`` keeps the
mini-batch size the trainer sets for them through verl's ``_update_actor`` (which would set
ppo_mini_batch_size x rollout.n rows) and through the pickling / deep copies on the way to the
workers. The trainer-level check (the same update as masking, on a real seeded run) is
tests/test_trainer_cpu.py::test_rows_the_filter_dropped_leave_the_update_and_change_nothing_else.
"""

import copy
import pickle

import pytest

from recipe.iib_lpo.trainer.ppo_trainer import _PinnedExtraInfo, update_row_indices


def test_only_the_rows_that_train_go_to_the_update_when_their_count_divides():
    # 2 prompts x (2 parents + 2 x 3 branches), ceil(3/2) = 2 branches kept per parent: 12 of 16 rows
    keep = [True, True, True, False] * 4
    assert update_row_indices(keep, 1) == [i for i in range(16) if keep[i]]
    assert update_row_indices(keep, 4) == [i for i in range(16) if keep[i]]  # 12 = 3 x 4


def test_the_fewest_dropped_rows_fill_up_to_the_multiple_in_batch_order():
    keep = [True, False, True, False, True, False, False, False]
    # 3 train, multiple 2 -> 4 rows: the first dropped row (1) fills
    assert update_row_indices(keep, 2) == [0, 1, 2, 4]
    # multiple 4 -> 4 rows
    assert update_row_indices(keep, 4) == [0, 1, 2, 4]
    # multiple 8 -> the whole batch
    assert update_row_indices(keep, 8) == list(range(8))


def test_a_batch_with_no_training_row_still_gives_the_update_one_multiple():
    assert update_row_indices([False] * 6, 3) == [0, 1, 2]


@pytest.mark.parametrize("trains,multiple", [([True] * 6, 4), ([True] * 6, 0), ([], 1)])
def test_a_batch_that_does_not_split_is_refused(trains, multiple):
    with pytest.raises(ValueError, match="cannot be split"):
        update_row_indices(trains, multiple)


def test_the_pinned_mini_batch_survives_verls_update_pickling_and_deep_copies():
    info = _PinnedExtraInfo({"temperature": 1.0}, {"mini_batch_size": 12, "global_batch_size": 12})
    # what verl's _update_actor does with the batch's extra_info
    info.update({"mini_batch_size": 16, "global_batch_size": 16, "epochs": 1})
    for copied in (info, pickle.loads(pickle.dumps(info)), copy.deepcopy(info)):
        assert dict(copied) == {"temperature": 1.0, "mini_batch_size": 12, "global_batch_size": 12, "epochs": 1}
        copied.update(mini_batch_size=16)
        assert copied["mini_batch_size"] == 12
