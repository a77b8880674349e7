"""`hf_alphaedit.telemetry` on a tiny model: the null-space room (the rank of the edit keys inside the null space), the
collapse telemetry recorded with every batch and the collapse guard."""

from __future__ import annotations

import time

import pytest
import torch

from hf_alphaedit import AlphaEditModel, EditingArguments
from hf_alphaedit.errors import CollapseGuardError
from hf_alphaedit.methods import LayerUpdate
from hf_alphaedit.projection import orthogonal_complement
from hf_alphaedit.publishing import edit_log
from hf_alphaedit.state import BatchRecord, EditState
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
    # With no tolerance (all keys at once) every float32 round-off residue counts as a direction of its own.
    assert null_space_room(model, rtol=0.0)[1].used == 4
    assert null_space_room(model, rtol=1e-3)[1].used == 1


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
    # The batch-by-batch count agrees with the rank of all keys at once.
    assert {layer: r.used for layer, r in null_space_room(model, rtol=1e-5).items()} == {1: 2, 2: 3}
    model.revert()
    assert [(r.num_keys, r.used) for r in null_space_room(model).values()] == [(2, 2), (2, 2)]


def test_running_out_of_room_is_warned_once_per_layer(corpus, caplog):
    # A low absolute threshold leaves layer 1 a null space of a few directions and layer 2 a larger one.
    model = AlphaEditModel(_scaled_model(), tiny_tokenizer(),
                           _args(corpus, layers=LAYERS, nullspace_threshold=2e-3))
    dims = {layer: basis.shape[1] for layer, basis in model.projector.bases.items()}
    assert 4 < dims[1] < 8 and dims[2] > 16, dims  # the case this test is about
    requests = [{"prompt": "{} is located in", "subject": subject, "target_new": "Rome"}
                for subject in ("The tower", "The bridge", "The castle", "The river", "The palace", "The harbour",
                                "The market", "The temple")]
    with caplog.at_level("WARNING", logger="hf_alphaedit.engine"):
        report = model.edit(requests[:4]).batches[0]
    left = {entry.layer: entry.null_space_left for entry in report.telemetry.layers}
    assert left == {1: dims[1] - 4, 2: dims[2] - 4}
    warnings = [r.getMessage() for r in caplog.records if r.name == "hf_alphaedit.engine"]
    assert warnings == [f"layer 1: {dims[1] - 4} null-space directions left after 4 edits, fewer than this batch's 4: "
                        "from here on edits at this layer share directions with earlier edits and the solve trades "
                        "new edits off against old ones (the preserved keys stay protected: every update still lies "
                        "in their null space; measured on SmolLM2: a slow decline of efficacy and specificity, see "
                        "the README's lifelong section). A projector with more room (a higher nullspace_threshold) "
                        "protects less of what the model knew."]
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_alphaedit.engine"):
        report = model.edit(requests[4:]).batches[0]
    assert {entry.layer: entry.null_space_left for entry in report.telemetry.layers} == {1: 0, 2: dims[2] - 8}
    assert not [r for r in caplog.records if r.name == "hf_alphaedit.engine"]  # layer 1 was reported already


def test_room_errors_name_the_problem(corpus):
    with pytest.raises(ValueError, match="rtol=1.5"):
        null_space_room(_editor(corpus), rtol=1.5)
    with pytest.raises(ValueError, match="edits without the null-space projection"):
        null_space_room(_editor(corpus, method="memit"))


# -- the collapse telemetry of every batch ------------------------------------------------------------------------

REQUESTS = [{"prompt": "{} is located in", "subject": "The tower", "target_new": "Rome"},
            {"prompt": "{} was made by", "subject": "The phone", "target_new": "Nokia"}]


def _norm(matrix: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(matrix.double()))


def test_batch_telemetry_measures_the_weights_the_solve_and_the_targets(corpus, tmp_path):
    model = _editor(corpus)
    engine = model.engine
    names = {layer: model.spec.rewrite_module_name(layer) for layer in LAYERS}
    before = {layer: engine.weight(names[layer]).detach().clone() for layer in LAYERS}
    report = model.edit(REQUESTS).batches[0]
    record = model.state.batches[0]
    assert record.telemetry == report.telemetry.to_dict()
    room = null_space_room(model)
    method = model.method
    for entry in report.telemetry.layers:
        layer = entry.layer
        after = engine.weight(names[layer]).detach()
        assert entry.module == names[layer]
        assert entry.update_norm == pytest.approx(_norm(after - before[layer]), rel=1e-4)
        assert entry.weight_norm == pytest.approx(_norm(after), rel=1e-6)
        assert entry.original_norm == pytest.approx(_norm(before[layer]), rel=1e-6)
        assert entry.weight_growth == pytest.approx(_norm(after) / _norm(before[layer]), rel=1e-6)
        assert entry.null_space_left == room[layer].left
        # AlphaEdit's system of the first batch: Ûᵀ K Kᵀ Û + λ₂ I (no previous edits yet), its condition number.
        basis = method.bases[layer]
        projected = basis.T @ record.layers[LAYERS.index(layer)].keys.T.to(basis)
        system = projected @ projected.T + model.hparams.l2 * torch.eye(basis.shape[1], dtype=basis.dtype)
        assert entry.condition_number == pytest.approx(float(torch.linalg.cond(system)), rel=1e-3)
        assert entry.condition_number <= float(torch.linalg.cond(system)) * (1 + 1e-9)  # a lower bound
    assert [e.layer for e in report.telemetry.layers] == LAYERS
    # Target norms: ‖z‖, ‖z − h‖ and ‖h‖ per request; the targets moved, at most as far as the clamp lets them.
    telemetry = report.telemetry
    assert len(telemetry.target_norms) == len(telemetry.target_shift_norms) == len(telemetry.hidden_norms) == len(REQUESTS)
    assert all(shift > 0 for shift in telemetry.target_shift_norms)
    for z, shift, h in zip(telemetry.target_norms, telemetry.target_shift_norms, telemetry.hidden_norms, strict=True):
        assert shift <= model.hparams.clamp_norm_factor * h * (1 + 1e-5)
        assert abs(h - shift) <= z * (1 + 1e-5) <= (h + shift) * (1 + 1e-5)  # z = h + δ: the triangle inequality
    # The telemetry is saved with the edit state and written into the edit log.
    model.state.save(tmp_path / "state")
    assert EditState.load(tmp_path / "state").batches[0].telemetry == record.telemetry
    lines = [line for line in edit_log(model) if line["event"] == "edit"]
    assert [line["target_norm"] for line in lines] == report.telemetry.target_norms
    assert [line["hidden_norm"] for line in lines] == report.telemetry.hidden_norms
    assert lines[0]["telemetry"] == record.telemetry["layers"]


def test_telemetry_of_a_method_without_null_space(corpus):
    model = _editor(corpus, method="memit")
    telemetry = model.edit(REQUESTS).batches[0].telemetry
    assert all(entry.null_space_left is None for entry in telemetry.layers)
    # MEMIT's system λC₀ + K Kᵀ is reported for every layer (an estimate; exact to 1e-3 here).
    method = model.method
    for entry, update in zip(telemetry.layers, model.state.batches[0].layers, strict=True):
        keys64 = update.keys.T.double()
        system = method.preserved[entry.layer] + keys64 @ keys64.T
        assert entry.condition_number == pytest.approx(float(torch.linalg.cond(system)), rel=1e-3)


def test_collapse_guard_refuses_a_batch_atomically(corpus):
    model = _editor(corpus)
    growth = model.edit(REQUESTS).batches[0].telemetry.max_weight_growth
    assert growth > 1
    model.revert()
    names = [model.spec.rewrite_module_name(layer) for layer in LAYERS]
    weights = {name: model.engine.weight(name).detach().clone() for name in names}
    model.editing_args.collapse_guard = 1 + (growth - 1) / 2
    with pytest.raises(CollapseGuardError, match=r"collapse_guard: batch 0 \(2 edits\) would grow .* past collapse_guard"):
        model.edit(REQUESTS)
    assert not model.state.batches
    assert all(torch.equal(model.engine.weight(name), weights[name]) for name in names)
    # The same batch under a guard above its growth goes through, with the same growth.
    model.editing_args.collapse_guard = growth * 1.01
    assert model.edit(REQUESTS).batches[0].telemetry.max_weight_growth == pytest.approx(growth)


def test_collapse_guard_setting_is_checked():
    with pytest.raises(ValueError, match="EditingArguments.collapse_guard"):
        EditingArguments(collapse_guard=0.5)
