"""The stream position shared by every training stream: entries in plan order across epochs, the state
that resumes there, and a resumed preference stream batching exactly what the uninterrupted one does."""

from __future__ import annotations

import pytest
import torch

from fasttune.data.pair_batches import ExampleStream
from fasttune.data.position import EpochPosition, seeded_batches


def test_takes_each_epochs_plan_in_order_and_resumes_at_its_state():
    plans = {e: [f"{e}a", f"{e}b", f"{e}c"] for e in range(4)}
    asked: list[int] = []
    position = EpochPosition(lambda e: asked.append(e) or plans[e])
    taken = [position.take() for _ in range(5)]
    assert taken == ["0a", "0b", "0c", "1a", "1b"] and set(asked) == {0, 1}
    assert position.state_dict() == {"epoch": 1, "index": 2} and len(position) == 3
    resumed = EpochPosition(plans.__getitem__)
    resumed.load_state_dict(position.state_dict())
    assert [resumed.take() for _ in range(3)] == [position.take() for _ in range(3)] == ["1c", "2a", "2b"]


@pytest.mark.parametrize("state", [{"epoch": 0, "index": 3}, {"epoch": 2, "index": -1}])
def test_a_position_outside_its_epoch_is_refused(state):
    with pytest.raises(ValueError, match="outside an epoch of 3 micro-batches; was the dataset or batch"):
        EpochPosition(lambda e: [0, 1, 2]).load_state_dict(state)


def test_seeded_batches_permute_every_index_once_per_epoch():
    first, second = seeded_batches(7, 3, seed=5, epoch=0), seeded_batches(7, 3, seed=5, epoch=1)
    assert [len(b) for b in first] == [3, 3, 1]
    assert sorted(sum(first, [])) == sorted(sum(second, [])) == list(range(7))
    assert first != second and seeded_batches(7, 3, seed=5, epoch=0) == first


def test_example_stream_resumed_mid_epoch_equals_uninterrupted():
    rows = list(range(10, 17))  # 7 examples, batches of 2: 4 micro-batches per epoch, the last one short
    collate = lambda xs: {"rows": torch.tensor(xs)}  # noqa: E731
    stream = ExampleStream(rows, 2, collate, seed=3)
    epoch = [next(stream)["rows"].tolist() for _ in range(len(stream))]
    assert len(stream) == 4 and sorted(sum(epoch, [])) == rows and stream.state_dict() == {"epoch": 1,
                                                                                            "index": 0}
    next(stream)
    state = stream.state_dict()
    expected = [next(stream)["rows"].tolist() for _ in range(6)]  # into the third epoch
    resumed = ExampleStream(rows, 2, collate, seed=3)
    resumed.load_state_dict(state)
    assert state == {"epoch": 1, "index": 1}
    assert [next(resumed)["rows"].tolist() for _ in range(6)] == expected
    with pytest.raises(ValueError, match="outside an epoch of 4 micro-batches"):
        resumed.load_state_dict({"epoch": 0, "index": 4})


def test_with_epoch_windows_a_step_takes_no_micro_batch_of_the_next_epoch():
    """4 micro-batches an epoch at accumulation 3: windows of 3 and 1, also after a resume at index 3."""
    collate = lambda xs: {"rows": torch.tensor(xs)}  # noqa: E731
    stream = ExampleStream(list(range(7)), 2, collate, seed=3, epoch_windows=True)
    sizes = []
    for _ in range(4):
        sizes.append(stream.window_size(3))
        for _ in range(sizes[-1]):
            next(stream)
    assert sizes == [3, 1, 3, 1] and stream.state_dict() == {"epoch": 2, "index": 0}
    stream.load_state_dict({"epoch": 0, "index": 3})
    assert stream.window_size(3) == 1
    assert ExampleStream(list(range(7)), 2, collate, seed=3).window_size(3) == 3  # windows may cross
