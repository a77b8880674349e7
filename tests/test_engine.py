"""Exactness and safety of the editing engine on tiny random models (ALGORITHMS.md §15)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import HfArgumentParser

from hf_alphaedit import AlphaEditModel, EditingArguments, EditRequestError, KeyStatistics, NullSpaceProjector
from hf_alphaedit.architectures import resolve_model_spec
from hf_alphaedit.forward import run_until
from hf_alphaedit.methods import EditContext
from hf_alphaedit.methods.alphaedit import AlphaEdit
from hf_alphaedit.methods.keys import LayerKeyReader
from hf_alphaedit.methods.memit import Memit
from hf_alphaedit.methods.prompts import generate_context_templates, target_token_ids
from hf_alphaedit.methods.targets import TargetOptimizer, choose_forward_mode
from hf_alphaedit.projection import null_space_mask
from hf_alphaedit.requests import as_edit_requests
from hf_alphaedit.statistics import collect_key_statistics
from tests.tiny_models import TINY_FAMILIES, tiny_causal_lm, tiny_tokenizer

REQUESTS = [
    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle", "target_new": "English language"},
    {"prompt": "{}, who plays the", "subject": "Miles Davis", "target_new": "piano"},
]


def _args(tmp_path, **overrides) -> EditingArguments:
    values = {"statistics_corpus": str(tmp_path / "corpus.txt"), "statistics_samples": 60,
              "statistics_cache_dir": str(tmp_path / "stats"), "disable_tqdm": True, "v_num_grad_steps": 8,
              "v_lr": 0.5}
    values.update(overrides)
    return EditingArguments(**values)


def _scaled_model(family: str = "llama") -> torch.nn.Module:
    """A tiny model whose keys are large enough for a non-trivial null space at the reference threshold."""
    model = tiny_causal_lm(family)
    spec = resolve_model_spec(model)
    with torch.no_grad():
        for layer in range(spec.num_layers):
            for module in spec.block(model, layer).modules():
                if isinstance(module, torch.nn.Linear) and module is not spec.rewrite_module(model, layer):
                    module.weight.mul_(4.0)
    return model


# -- the closed-form solves ------------------------------------------------------------------------------------


def _random_solve_problem(d_k: int = 24, d: int = 16, n: int = 5, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    corpus_keys = torch.randn(400, d_k, generator=generator, dtype=torch.float64)
    corpus_keys[:, d_k // 2:] *= 0.05  # half of the key space is (nearly) unused
    statistics = KeyStatistics({0: corpus_keys.T @ corpus_keys}, {0: 400})
    keys = torch.randn(n, d_k, generator=generator, dtype=torch.float64)
    residuals = torch.randn(n, d, generator=generator, dtype=torch.float64)
    previous = torch.randn(7, d_k, generator=generator, dtype=torch.float64)
    return statistics, keys, residuals, previous


class _StubContext:
    """Only what the solves read from an EditContext."""

    def __init__(self, l2: float = 10.0, mom2_update_weight: float = 15000.0) -> None:
        self.hparams = type("H", (), {"l2": l2, "layers": (0,), "mom2_update_weight": mom2_update_weight})()
        self.model = torch.nn.Linear(1, 1)


def _alphaedit(statistics: KeyStatistics, threshold: float, l2: float = 10.0) -> AlphaEdit:
    projector = NullSpaceProjector.from_statistics(statistics, threshold)
    return AlphaEdit(_StubContext(l2), projector=projector)


def test_reduced_alphaedit_solve_equals_reference_dense_formula():
    statistics, keys, residuals, previous = _random_solve_problem()
    method = _alphaedit(statistics, threshold=0.05)
    basis = method.bases[0]
    method.previous_gram[0] = basis.T @ previous.T @ previous @ basis
    delta = residuals.T @ method.solve(0, keys, residuals)
    projector = method.projector.dense(0)
    d_k = keys.shape[1]
    # Reference (§5.4): M = P (K Kᵀ + C_p) + λ₂ I,  X = M⁻¹ P K Rᵀ,  ΔW = Xᵀ.
    system = projector @ (keys.T @ keys + previous.T @ previous) + 10.0 * torch.eye(d_k, dtype=torch.float64)
    reference = torch.linalg.solve(system, projector @ keys.T @ residuals).T
    assert 0 < method.projector.null_space_dim(0) < d_k
    torch.testing.assert_close(delta, reference, rtol=1e-9, atol=1e-11)
    # The update lies in the null space: ΔW (I − P) = 0.
    eye = torch.eye(d_k, dtype=torch.float64)
    assert (delta @ (eye - projector)).abs().max() < 1e-12


def test_alphaedit_limits_ridge_regression_and_zero_projector():
    statistics, keys, residuals, _ = _random_solve_problem()
    everything = _alphaedit(statistics, threshold=1e9)  # P = I, C_p = 0
    delta = residuals.T @ everything.solve(0, keys, residuals)
    ridge = residuals.T @ keys @ torch.linalg.inv(keys.T @ keys + 10.0 * torch.eye(keys.shape[1], dtype=torch.float64))
    torch.testing.assert_close(delta, ridge, rtol=1e-9, atol=1e-11)
    nothing = _alphaedit(statistics, threshold=0.0)  # P = 0
    assert nothing.projector.null_space_dim(0) == 0
    assert (residuals.T @ nothing.solve(0, keys, residuals)).abs().max() == 0


def test_memit_solve_satisfies_normal_equations():
    statistics, keys, residuals, _ = _random_solve_problem()
    context = _StubContext()
    context.statistics = lambda layers: statistics
    method = Memit(context)
    delta = residuals.T @ method.solve(0, keys, residuals)
    moment = statistics.second_moment(0)
    torch.testing.assert_close(delta @ (keys.T @ keys + 15000.0 * moment), residuals.T @ keys, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("mode", ["absolute", "relative", "energy"])
def test_null_space_threshold_modes(mode):
    eigenvalues = torch.tensor([1e-4, 1e-3, 1e-2, 1.0, 10.0], dtype=torch.float64)
    threshold = {"absolute": 2e-2, "relative": 2e-3, "energy": 1e-3}[mode]
    assert null_space_mask(eigenvalues, threshold, mode).tolist() == [True, True, True, False, False] \
        if mode != "energy" else null_space_mask(eigenvalues, threshold, mode).tolist() == [True, True, False,
                                                                                              False, False]


# -- statistics -------------------------------------------------------------------------------------------------


def test_one_pass_statistics_equal_naive_per_layer_sums_and_merge(wikitext_lines):
    model, tokenizer = tiny_causal_lm("llama"), tiny_tokenizer()
    spec = resolve_model_spec(model)
    texts = wikitext_lines[:24]
    stats = collect_key_statistics(model, tokenizer, spec, [1, 3], texts, max_length=64, batch_tokens=256,
                                   show_progress=False)
    for layer in (1, 3):
        naive, count = torch.zeros(spec.key_size, spec.key_size, dtype=torch.float64), 0
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=64, return_tensors="pt")["input_ids"]
            seen: dict[str, torch.Tensor] = {}
            handle = spec.rewrite_module(model, layer).register_forward_pre_hook(
                lambda _m, args, seen=seen: seen.__setitem__("k", args[0][0].double()))
            with torch.no_grad():
                model(ids)
            handle.remove()
            naive += seen["k"].T @ seen["k"]
            count += ids.shape[1]
        assert stats.counts[layer] == count
        torch.testing.assert_close(stats.sums[layer], naive, rtol=1e-5, atol=1e-6)
    halves = [collect_key_statistics(model, tokenizer, spec, [1, 3], part, max_length=64, batch_tokens=1024,
                                     show_progress=False) for part in (texts[:10], texts[10:])]
    merged = halves[0].merge(halves[1])
    assert merged.counts == stats.counts
    torch.testing.assert_close(merged.second_moment(3), stats.second_moment(3), rtol=1e-6, atol=1e-8)


def test_statistics_are_cached_on_disk(corpus, monkeypatch):
    model = AlphaEditModel(tiny_causal_lm("llama"), tiny_tokenizer(), _args(corpus))
    first = model.key_statistics([1, 2])
    again = AlphaEditModel(tiny_causal_lm("llama"), tiny_tokenizer(), _args(corpus))
    monkeypatch.setattr("hf_alphaedit.provider.collect_key_statistics",
                        lambda *a, **k: pytest.fail("statistics were recomputed"))
    second = again.key_statistics([2, 1])
    for layer in (1, 2):
        assert torch.equal(first.sums[layer], second.sums[layer])


# -- targets and keys ------------------------------------------------------------------------------------------


def _reference_targets(model, tokenizer, spec, hparams, templates, request) -> torch.Tensor:
    """The reference per-request loop (§3.4–3.6) written plainly: full forwards, torch.optim.Adam."""
    optimizer_inputs = TargetOptimizer(model, tokenizer, spec, hparams, templates)
    sequences, target = optimizer_inputs.sequences(request)
    width = max(len(s.ids) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s.ids)] = torch.tensor(s.ids)
        mask[i, : len(s.ids)] = 1
    lookups = [s.lookup for s in sequences]
    delta = torch.zeros(spec.hidden_size, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hparams.v_lr)
    state = {}

    def add_delta(_m, _a, out):
        hidden = out[0] if isinstance(out, tuple) else out
        if "h_init" not in state:
            state["h_init"] = hidden[0, lookups[0]].detach().clone()
        hidden = hidden.clone()
        for i, position in enumerate(lookups):
            hidden[i, position] += delta
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    handle = spec.block(model, hparams.z_layer).register_forward_hook(add_delta)
    try:
        for it in range(hparams.v_num_grad_steps):
            optimizer.zero_grad()
            logits = model(input_ids=ids, attention_mask=mask).logits
            log_probs = torch.log_softmax(logits.float(), -1)
            nll = torch.stack([
                -torch.stack([log_probs[i, p, t] for p, t in zip(s.label_positions, target, strict=True)]).mean()
                for i, s in enumerate(sequences[:-1])]).mean()
            kl_now = log_probs[len(sequences) - 1, lookups[-1]]
            if it == 0:
                state["kl0"] = kl_now.detach()
            kl = (kl_now.exp() * (kl_now - state["kl0"])).sum()
            h_norm = state["h_init"].norm()
            loss = nll + hparams.kl_factor * kl + hparams.v_weight_decay * delta.norm() / h_norm**2
            if loss < hparams.v_early_stop_loss or it == hparams.v_num_grad_steps - 1:
                break
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                max_norm = hparams.clamp_norm_factor * h_norm
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    finally:
        handle.remove()
    return (state["h_init"] + delta).detach()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_targets_equal_reference_per_request_loop(family):
    model, tokenizer = tiny_causal_lm(family), tiny_tokenizer()
    model.requires_grad_(False)
    spec = resolve_model_spec(model)
    templates = generate_context_templates(model, tokenizer, 6, 3, seed=0)
    requests = as_edit_requests(REQUESTS)
    # The reference's step size. A step far above the hidden state's norm (0.5 against |h| ≈ 0.23 here) crosses
    # the clamp at every step, and Adam then amplifies float round-off (summation order) by ~10x per step.
    # Layers below the last block: δ at the last block's subject position cannot reach the target positions, so
    # the NLL would not depend on it and Adam would normalise round-off-sized gradients.
    probe_hparams = EditingArguments(v_lr=0.1, v_num_grad_steps=1, layers=[0, 1]).resolve(spec)
    initial = sorted(TargetOptimizer(model, tokenizer, spec, probe_hparams, templates).optimize(requests).losses)
    # A threshold between the two lowest initial losses: one request stops at once, the others go on, which
    # exercises per-request stopping (and the frozen Adam state of a stopped row).
    threshold = (initial[0] + initial[1]) / 2
    hparams = EditingArguments(v_lr=0.1, v_num_grad_steps=12, v_early_stop_loss=threshold, layers=[0, 1]).resolve(
        spec)
    batched = TargetOptimizer(model, tokenizer, spec, hparams, templates).optimize(requests)
    assert len(set(batched.steps)) > 1, "the test needs requests that stop at different iterations"
    for row, request in enumerate(requests):
        expected = _reference_targets(model, tokenizer, spec, hparams, templates, request)
        torch.testing.assert_close(batched.values[row], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["prefix_cache", "blocks", "full"])
def test_forward_modes_and_chunking_give_the_same_targets(mode):
    model, tokenizer = tiny_causal_lm("llama"), tiny_tokenizer()
    model.requires_grad_(False)
    spec = resolve_model_spec(model)
    hparams = EditingArguments(v_lr=0.1, v_num_grad_steps=6, layers=[0, 1]).resolve(spec)  # see the test above
    templates = generate_context_templates(model, tokenizer, 6, 3, seed=0)
    requests = as_edit_requests(REQUESTS)
    reference = TargetOptimizer(model, tokenizer, spec, hparams, templates, mode="full").optimize(requests)
    one_at_a_time = TargetOptimizer(model, tokenizer, spec, hparams, templates, mode=mode,
                                    batch_tokens=1).optimize(requests)
    torch.testing.assert_close(one_at_a_time.values, reference.values, rtol=1e-4, atol=1e-5)
    assert one_at_a_time.steps == reference.steps


def test_target_optimisation_without_templates_is_refused_up_front():
    # Without '{}' no request has a rewriting prompt; this used to fail deep inside with an IndexError.
    model = tiny_causal_lm("llama")
    spec = resolve_model_spec(model)
    with pytest.raises(ValueError, match="templates is empty"):
        TargetOptimizer(model, tiny_tokenizer(), spec, EditingArguments(layers=[0, 1]).resolve(spec), [])


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_family_takes_the_prefix_cache_fast_path(family, caplog):
    """The fastest target-optimisation mode must pass its numeric check on every supported family with the
    installed transformers (a transformers API change that breaks it shows up here, not as a silent slowdown)."""
    model, tokenizer = tiny_causal_lm(family), tiny_tokenizer()
    model.requires_grad_(False)
    spec = resolve_model_spec(model)
    hparams = EditingArguments(layers=[0, 1]).resolve(spec)
    templates = generate_context_templates(model, tokenizer, 6, 2, seed=0)
    with caplog.at_level("WARNING", logger="hf_alphaedit"):
        mode = choose_forward_mode(model, tokenizer, spec, hparams, templates, as_edit_requests(REQUESTS[:2]))
    assert mode == "prefix_cache", caplog.text
    assert not caplog.records


def test_a_broken_fast_path_falls_back_with_a_warning(caplog, monkeypatch):
    model, tokenizer = tiny_causal_lm("llama"), tiny_tokenizer()
    model.requires_grad_(False)
    spec = resolve_model_spec(model)
    hparams = EditingArguments(layers=[0, 1]).resolve(spec)
    templates = generate_context_templates(model, tokenizer, 6, 2, seed=0)

    def broken(*_args, **_kwargs):
        raise TypeError("unexpected keyword argument 'cache'")

    monkeypatch.setattr("hf_alphaedit.forward.BlockRunner.run", broken)
    with caplog.at_level("WARNING", logger="hf_alphaedit"):
        mode = choose_forward_mode(model, tokenizer, spec, hparams, templates, as_edit_requests(REQUESTS[:2]))
    assert mode == "full"
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("'prefix_cache' unavailable" in m and "unexpected keyword argument" in m for m in messages)
    assert any("full forward passes" in m for m in messages)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_fast_key_reader_matches_full_forwards_after_updates(family):
    model, tokenizer = tiny_causal_lm(family), tiny_tokenizer()
    spec = resolve_model_spec(model)
    hparams = EditingArguments(layers=[0, 1, 2]).resolve(spec)
    templates = generate_context_templates(model, tokenizer, 6, 2, seed=0)
    requests = as_edit_requests(REQUESTS)
    fast = LayerKeyReader(model, tokenizer, spec, hparams, templates, requests)
    slow = LayerKeyReader(model, tokenizer, spec, hparams, templates, requests, use_block_runner=False)
    generator = torch.Generator().manual_seed(0)
    for i, layer in enumerate(hparams.layers):
        keys_fast, z_fast = fast.read(i)
        keys_slow, z_slow = slow.read(i)
        torch.testing.assert_close(keys_fast, keys_slow, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(z_fast, z_slow, rtol=1e-5, atol=1e-5)
        delta = 0.05 * torch.randn(spec.hidden_size, spec.key_size, generator=generator)
        spec.add_to_weight(model, layer, delta)


def test_keys_at_a_layer_ignore_edits_at_and_above_it():
    model, tokenizer = tiny_causal_lm("llama"), tiny_tokenizer()
    spec = resolve_model_spec(model)
    hparams = EditingArguments(layers=[1, 2]).resolve(spec)
    templates = generate_context_templates(model, tokenizer, 6, 2, seed=0)
    requests = as_edit_requests(REQUESTS)
    before, _ = LayerKeyReader(model, tokenizer, spec, hparams, templates, requests).read(0)
    for layer in (1, 2, 3):
        spec.add_to_weight(model, layer, torch.ones(spec.hidden_size, spec.key_size))
    after, _ = LayerKeyReader(model, tokenizer, spec, hparams, templates, requests).read(0)
    assert torch.equal(before, after)


def test_target_ids_have_a_leading_space_and_no_bos():
    tokenizer = tiny_tokenizer()
    ids = target_token_ids(tokenizer, "Rome")
    assert tokenizer.decode(ids) == " Rome"
    assert ids == target_token_ids(tokenizer, " Rome")


# -- the engine ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_edit_changes_only_the_edited_weights(family, corpus):
    model = AlphaEditModel(tiny_causal_lm(family), tiny_tokenizer(), _args(corpus, layers=[1, 2]))
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    result = model.edit(REQUESTS[:2])
    edited = {model.spec.rewrite_module_name(layer) + ".weight" for layer in (1, 2)}
    after = model.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == edited
    assert result.num_edits == 2 and len(model.state.batches) == 1
    for update in model.state.batches[0].layers:
        torch.testing.assert_close(model.spec.weight(model.model, update.layer).detach(),
                                   _math_weight(model.spec, before, update.layer) + update.delta,
                                   rtol=1e-6, atol=1e-6)


def _math_weight(spec, state_dict, layer):
    weight = state_dict[spec.rewrite_module_name(layer) + ".weight"]
    return weight.T if spec.conv1d else weight


def test_alphaedit_update_leaves_preserved_keys_nearly_unchanged(corpus, wikitext_lines):
    model = AlphaEditModel(_scaled_model(), tiny_tokenizer(), _args(corpus, layers=[2]))
    projector = model.projector
    r, d_k = projector.null_space_dim(2), model.spec.key_size
    assert 0 < r < d_k, "the test needs a non-trivial null space"
    model.edit(REQUESTS)
    delta = model.state.accumulated_delta(2).double()
    dense = projector.dense(2)
    assert (delta - delta @ dense).abs().max() < 1e-5 * delta.abs().max()
    # RMS change of preserved outputs ≤ ‖ΔW‖₂ · sqrt(Σ_{s_j<τ} s_j)  (§15)
    stats = model.key_statistics([2])
    change = torch.trace(delta @ stats.second_moment(2) @ delta.T).sqrt()
    bound = torch.linalg.matrix_norm(delta, 2) * math.sqrt(float(projector.eigenvalues[2][:r].clamp_min(0).sum()))
    assert change <= bound * (1 + 1e-6)


def test_sequential_batches_accumulate_previous_keys(corpus):
    model = AlphaEditModel(_scaled_model(), tiny_tokenizer(), _args(corpus, layers=[2]))
    model.edit(REQUESTS, batch_size=2)
    assert len(model.state.batches) == 2
    basis = model.method.bases[2]
    keys = torch.cat([b.layers[0].keys for b in model.state.batches]).double()
    torch.testing.assert_close(model.method.previous_gram[2], basis.T @ keys.T @ keys @ basis)


def test_a_failing_batch_leaves_weights_and_state_bit_for_bit_unchanged(corpus, monkeypatch):
    model = AlphaEditModel(_scaled_model(), tiny_tokenizer(), _args(corpus, layers=[1, 2, 3]))
    model.edit(REQUESTS[:1])
    weights = {k: v.clone() for k, v in model.model.state_dict().items()}
    gram = {k: v.clone() for k, v in model.method.previous_gram.items()}
    original_apply = model.method.context.apply
    calls = []

    def failing_apply(update):
        calls.append(update.layer)
        if len(calls) == 3:  # after two of the three layers were already changed
            raise RuntimeError("injected failure")
        original_apply(update)

    monkeypatch.setattr(model.method.context, "apply", failing_apply)
    with pytest.raises(RuntimeError, match="injected failure"):
        model.edit(REQUESTS[1:])
    assert calls == [1, 2, 3]
    for key, value in model.model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    for key, value in model.method.previous_gram.items():
        assert torch.equal(value, gram[key])
    assert len(model.state.batches) == 1


def test_invalid_requests_are_rejected_before_any_change(corpus):
    model = AlphaEditModel(tiny_causal_lm("llama"), tiny_tokenizer(), _args(corpus))
    weights = {k: v.clone() for k, v in model.model.state_dict().items()}
    bad = [REQUESTS[0], {"prompt": "{} plays", "subject": "", "target_new": "x"},
           {"prompt": "Paris is nice", "subject": "Rome", "target_new": "y"}]
    with pytest.raises(EditRequestError) as error:
        model.edit(bad)
    assert "record 1" in str(error.value) and "record 2" in str(error.value)
    assert all(torch.equal(v, weights[k]) for k, v in model.model.state_dict().items())
    assert model.state.batches == []


def test_editing_is_deterministic_under_a_seed(corpus):
    results = []
    for _ in range(2):
        model = AlphaEditModel(_scaled_model(), tiny_tokenizer(), _args(corpus, layers=[1, 2], seed=3))
        model.edit(REQUESTS)
        results.append((model.state.context_templates, model.spec.weight(model.model, 2).clone()))
    assert results[0][0] == results[1][0]
    assert torch.equal(results[0][1], results[1][1])


def test_memit_method_edits(corpus):
    model = AlphaEditModel(_scaled_model(), tiny_tokenizer(), _args(corpus, method="memit", layers=[1, 2]))
    before = model.spec.weight(model.model, 2).clone()
    model.edit(REQUESTS)
    assert not torch.equal(before, model.spec.weight(model.model, 2))
    with pytest.raises(ValueError, match="edits without the null-space projection"):
        _ = model.projector


def test_bf16_model_edits_through_a_float32_master(corpus):
    model = AlphaEditModel(_scaled_model().to(torch.bfloat16), tiny_tokenizer(), _args(corpus, layers=[2]))
    original = model.spec.weight(model.model, 2).float().clone()
    model.edit(REQUESTS[:2])
    master = model.engine.edited_tensors()[1]["model.layers.2.mlp.down_proj"]
    torch.testing.assert_close(master, original + model.state.accumulated_delta(2), rtol=0, atol=1e-6)
    assert torch.equal(model.spec.weight(model.model, 2), master.to(torch.bfloat16))


def test_wrapper_delegates_to_the_transformers_model(corpus):
    model = AlphaEditModel(tiny_causal_lm("llama"), tiny_tokenizer(), _args(corpus))
    ids = model.tokenizer("Paris is", return_tensors="pt")
    assert model.config.model_type == "llama"
    assert torch.equal(model(**ids).logits, model.model(**ids).logits)
    assert model.generate(**ids, max_new_tokens=2, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 2


def test_state_round_trips(corpus, tmp_path):
    from hf_alphaedit import EditState

    model = AlphaEditModel(_scaled_model(), tiny_tokenizer(), _args(corpus, layers=[1, 2]))
    model.edit(REQUESTS, batch_size=2)
    model.state.save(tmp_path / "state")
    loaded = EditState.load(tmp_path / "state")
    assert loaded.context_templates == model.state.context_templates
    assert [r.subject for b in loaded.batches for r in b.requests] == [r["subject"] for r in REQUESTS]
    for layer in (1, 2):
        assert torch.equal(loaded.accumulated_delta(layer), model.state.accumulated_delta(layer))


# -- arguments -------------------------------------------------------------------------------------------------


def test_arguments_parse_from_cli_json_and_strings(tmp_path):
    (args,) = HfArgumentParser(EditingArguments).parse_args_into_dataclasses(
        ["--method", "memit", "--layers", "3", "4", "--v_lr", "1e-1", "--batch_size", "20"])
    assert args.method == "memit" and args.layers == [3, 4] and args.v_lr == 0.1 and args.batch_size == 20
    args.to_json_file(tmp_path / "args.json")
    assert EditingArguments.from_json_file(tmp_path / "args.json") == args
    assert EditingArguments(v_lr="1e-4", layers=["5", "4"]).layers == [4, 5]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("method", "nope", "EditingArguments.method='nope'"),
    ("layers", [2, 2], "EditingArguments.layers"),
    ("v_lr", "fast", "EditingArguments.v_lr='fast'"),
    ("v_lr", -1.0, "EditingArguments.v_lr=-1.0"),
    ("fact_token", "first", "EditingArguments.fact_token"),
    ("nullspace_threshold_mode", "energy-ish", "EditingArguments.nullspace_threshold_mode"),
    ("batch_size", 0, "EditingArguments.batch_size=0"),
])
def test_bad_arguments_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(".", r"\.")):
        EditingArguments(**{field: value})


def test_unknown_fields_in_json_are_refused():
    with pytest.raises(ValueError, match="unknown field"):
        EditingArguments.from_dict({"method": "alphaedit", "learning_rate": 1})


def _spec(model_type: str, num_layers: int):
    from hf_alphaedit.architectures import ModelSpec

    gpt = model_type in ("gpt2", "gptj")
    return ModelSpec(model_type, "h.{}", "h.{}.mlp", None, num_layers, 8, 16, gpt and model_type == "gpt2",
                     "gpt" if gpt else "gated", None)


@pytest.mark.parametrize(("model_type", "num_layers", "layers", "v_lr", "steps"), [
    ("llama", 32, (4, 5, 6, 7, 8), 0.1, 25),
    ("gptj", 28, (3, 4, 5, 6, 7, 8), 0.5, 25),
    ("gpt2", 48, (13, 14, 15, 16, 17), 0.5, 20),
])
def test_reference_preset_reproduces_the_official_files(model_type, num_layers, layers, v_lr, steps):
    hp = EditingArguments(preset="reference").resolve(_spec(model_type, num_layers))
    assert (hp.layers, hp.v_lr, hp.v_num_grad_steps) == (layers, v_lr, steps)
    assert (hp.v_weight_decay, hp.clamp_norm_factor, hp.kl_factor) == (0.5, 0.75, 0.0625)
    assert (hp.nullspace_threshold, hp.l2) == (2e-2, 10.0)
    assert hp.mom2_update_weight == (20000.0 if model_type == "gpt2" else 15000.0)


def test_auto_preset_adapts_to_smollm2_depth():
    hp = EditingArguments().resolve(_spec("llama", 30))
    assert hp.layers == (4, 5, 6, 7, 8)
    assert hp.v_lr is None and hp.v_num_grad_steps > 25
    reference = EditingArguments(preset="reference").resolve(_spec("llama", 30))
    assert reference.layers == (4, 5, 6, 7, 8) and reference.v_lr == 0.1 and reference.v_num_grad_steps == 25


@pytest.mark.parametrize(("method", "preset", "clamp", "expected"), [
    ("alphaedit", "auto", None, 0.5),  # AlphaEdit's calibrated default
    ("alphaedit", "reference", None, 0.75),
    ("alphaedit", "auto", 0.75, 0.75),  # a set value always wins
    ("memit", "auto", None, 0.75),  # the calibration was AlphaEdit's only
    ("nse", "auto", None, 0.75),
])
def test_auto_clamp_is_alphaedits_calibrated_default_and_no_other_methods(method, preset, clamp, expected):
    args = EditingArguments(method=method, preset=preset, clamp_norm_factor=clamp)
    assert args.resolve(_spec("llama", 30)).clamp_norm_factor == expected


def test_layers_beyond_the_model_are_refused():
    with pytest.raises(ValueError, match="only 30 layers"):
        EditingArguments(layers=[29, 30]).resolve(_spec("llama", 30))


def test_run_until_stops_after_the_module():
    model = tiny_causal_lm("llama")
    spec = resolve_model_spec(model)
    calls = []
    handle = spec.block(model, 3).register_forward_pre_hook(lambda *_: calls.append(3))
    run_until(model, spec.block(model, 1), input_ids=torch.tensor([[1, 2, 3]]))
    handle.remove()
    assert calls == []


def test_the_wrapper_behaves_like_a_module(corpus):
    model = AlphaEditModel(_scaled_model(), tiny_tokenizer(), _args(corpus, layers=[1, 2]))
    assert isinstance(model, torch.nn.Module)
    assert model.eval() is model and not model.training and not model.model.training
    assert model.train() is model and model.model.training
    model.eval()
    assert model.to("cpu") is model and model.device == torch.device("cpu") and model.dtype == torch.float32
    model.edit(REQUESTS[:1])
    gram = {k: v.clone() for k, v in model.method.previous_gram.items()}
    assert model.to(torch.float64) is model and model.dtype == torch.float64
    # The method, whose constants lived in the old dtype, is rebuilt with its state from the applied batches.
    rebuilt = model.method.previous_gram
    assert all(torch.allclose(gram[k], rebuilt[k]) for k in gram)
    model.edit(REQUESTS[1:2])
    assert model.state.num_edits == 2 and model.spec.weight(model.model, 2).dtype == torch.float64
    assert sum(1 for _ in model.parameters()) == sum(1 for _ in model.model.parameters())


def test_edit_context_is_what_methods_receive(corpus):
    model = AlphaEditModel(tiny_causal_lm("llama"), tiny_tokenizer(), _args(corpus))
    assert isinstance(model.method.context, EditContext)
    assert model.method.context.hparams is model.hparams


def test_scalar_coercion_leaves_list_fields_alone():
    """A `list[int]` field is not a scalar: values from YAML/JSON are converted only for scalar fields."""
    from dataclasses import dataclass, field

    from hf_alphaedit.fields import validate_fields

    @dataclass
    class Config:
        lengths: list[int] = field(default_factory=lambda: [5, 10])
        steps: int | None = None
        rate: float = 1.0

        def __post_init__(self) -> None:
            validate_fields(self)

    assert Config(steps="3", rate="1e-4") == Config([5, 10], 3, 1e-4)
    with pytest.raises(ValueError, match="Config.steps='x': expected a int"):
        Config(steps="x")


@pytest.mark.parametrize("method, protect, state", [
    ("alphaedit", True, {"previous_gram"}), ("alphaedit", False, set()),
    ("memit", True, {"preserved"}), ("memit", False, set()), ("nse", True, {"preserved"}),
    ("rome", True, set()), ("ft", True, set())])
def test_the_per_batch_snapshot_copies_only_what_commit_changes(corpus, method, protect, state):
    from hf_alphaedit.engine import copy_method_state
    from hf_alphaedit.methods.alphaedit import AlphaEditConfig
    from hf_alphaedit.methods.memit import MemitConfig

    config = {"alphaedit": AlphaEditConfig(protect_previous_edits=protect),
              "memit": MemitConfig(protect_previous_edits=protect)}.get(method)
    model = AlphaEditModel(tiny_causal_lm("llama"), tiny_tokenizer(), _args(corpus, method=method),
                           method_config=config)
    assert set(copy_method_state(model.method)) == state  # constants (null-space bases, λC₀ of MEMIT) are not copied


def test_a_batch_failing_inside_commit_leaves_the_previous_edit_state_unchanged(corpus, monkeypatch):
    model = AlphaEditModel(_scaled_model(), tiny_tokenizer(), _args(corpus, layers=[1, 2, 3]))
    model.edit(REQUESTS[:1])
    weights = {k: v.clone() for k, v in model.model.state_dict().items()}
    gram = {k: v.clone() for k, v in model.method.previous_gram.items()}
    original_commit = model.method.commit

    def failing_commit(update):
        original_commit(update)  # every layer's Gram matrix already updated in place
        raise RuntimeError("injected failure")

    monkeypatch.setattr(model.method, "commit", failing_commit)
    with pytest.raises(RuntimeError, match="injected failure"):
        model.edit(REQUESTS[1:])
    assert all(torch.equal(v, weights[k]) for k, v in model.model.state_dict().items())
    assert all(torch.equal(v, gram[k]) for k, v in model.method.previous_gram.items())
    assert len(model.state.batches) == 1
