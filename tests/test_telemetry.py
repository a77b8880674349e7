"""`hf_alphaedit.telemetry.null_space_room` on a tiny model: the rank of the edit keys inside the null space."""

from __future__ import annotations

import time

import pytest
import torch

from hf_alphaedit import AlphaEditModel
from hf_alphaedit.methods import LayerUpdate
from hf_alphaedit.projection import orthogonal_complement
from hf_alphaedit.state import BatchRecord
from hf_alphaedit.telemetry import NullSpaceRoom, null_space_room
from tests.test_engine import _args, _scaled_model
from tests.tiny_models import tiny_tokenizer

LAYERS = [1, 2]


def _editor(corpus, method: str = "alphaedit") -> AlphaEditModel:
    return AlphaEditModel(_scaled_model(), tiny_tokenizer(), _args(corpus, layers=LAYERS, method=method))


def _record(layer: int, keys: torch.Tensor) -> BatchRecord:
    """A batch whose only content that matters here is its keys `[n, d_k]` at `layer` (the factors are zero)."""
    n, d_k = keys.shape
    update = LayerUpdate(layer, torch.zeros(4, n), torch.zeros(n, d_k), keys.float())
    return BatchRecord(0, [], [update], [], [], [], {}, time.time())


def test_room_counts_independent_key_directions_inside_the_null_space(corpus):
    model = _editor(corpus)
    basis = model.projector.bases[1]  # [d_k, r]
    preserved = orthogonal_complement(basis)[:, 0]  # a key direction the projector protects
    inside = basis[:, 0]
    # Three keys, but inside the null space they span one direction: the first has no component there,
    # the third is twice the second plus a protected direction.
    keys = torch.stack([preserved, inside, 2 * inside + preserved])
    model.state.batches.append(_record(1, keys))
    room = null_space_room(model)
    r = basis.shape[1]
    assert room[1] == NullSpaceRoom(layer=1, key_dim=basis.shape[0], null_space_dim=r, num_keys=3, used=1)
    assert room[1].left == r - 1 and room[1].fraction_left == pytest.approx((r - 1) / r)
    assert room[2] == NullSpaceRoom(2, basis.shape[0], model.projector.bases[2].shape[1], 0, 0)
    # A key that differs from another only by float32 round-off takes no direction of its own ...
    model.state.batches.append(_record(1, (inside * (1 + 1e-7))[None]))
    assert null_space_room(model)[1].used == 1
    # With no tolerance every float32 round-off residue counts as a direction of its own.
    assert null_space_room(model, rtol=0.0)[1].used == 4


def test_room_after_real_edits_and_undo(corpus):
    model = _editor(corpus)
    untouched = null_space_room(model)
    assert all(room.used == 0 and room.left == room.null_space_dim > 0 for room in untouched.values())
    model.edit([{"prompt": "{} is located in", "subject": "The tower", "target_new": "Rome"},
                {"prompt": "{} was made by", "subject": "The phone", "target_new": "Nokia"}])
    model.edit([{"prompt": "{} is located in", "subject": "The tower", "target_new": "Rome"}])
    room = null_space_room(model)
    # The repeated request's key at layer 1 does not depend on any edited weight, so it repeats exactly and
    # takes no new direction; at layer 2 it comes after layer 1's edit and differs.
    assert (room[1].num_keys, room[1].used) == (3, 2)
    assert (room[2].num_keys, room[2].used) == (3, 3)
    model.revert()
    assert [(r.num_keys, r.used) for r in null_space_room(model).values()] == [(2, 2), (2, 2)]


def test_room_errors_name_the_problem(corpus):
    with pytest.raises(ValueError, match="rtol=1.5"):
        null_space_room(_editor(corpus), rtol=1.5)
    with pytest.raises(ValueError, match="edits without the null-space projection"):
        null_space_room(_editor(corpus, method="memit"))
