"""target_memory_budget and statistics_memory_budget: parsing, batches sized from measured bytes, activation
checkpointing, peak RSS."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hf_alphaedit import EditingArguments
from hf_alphaedit.architectures import resolve_model_spec
from hf_alphaedit.memory import SavedTensorBytes, parse_memory_budget, resolve_memory_budget
from hf_alphaedit.methods.prompts import generate_context_templates
from hf_alphaedit.methods.targets import TargetOptimizer
from hf_alphaedit.requests import as_edit_requests
from hf_alphaedit.statistics import collect_key_statistics
from tests.tiny_models import TINY_FAMILIES, tiny_causal_lm, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FIELD = "EditingArguments.target_memory_budget"


@pytest.mark.parametrize(("value", "expected"), [
    ("2GiB", 2 * 2**30), ("800MB", 800 * 10**6), ("1.5g", 1_500_000_000), ("64 KiB", 65536), ("1e6", 10**6),
    (123456, 123456), ("auto", "auto"), ("none", None), (None, None)])
def test_budget_sizes_parse_with_their_units(value, expected):
    assert parse_memory_budget(FIELD, value) == expected


@pytest.mark.parametrize("value", ["lots", "-1GB", "0", "2 GiBs", True, float("inf")])
@pytest.mark.parametrize("field", ["target_memory_budget", "statistics_memory_budget"])
def test_a_bad_budget_names_the_field_and_the_accepted_forms(value, field):
    with pytest.raises(ValueError, match=rf"EditingArguments\.{field}"):
        EditingArguments(**{field: value})


def test_the_budget_is_kept_as_text_and_never_taken_from_published_edits():
    assert EditingArguments(target_memory_budget=2_000_000).target_memory_budget == "2000000"
    assert EditingArguments(target_memory_budget="none").target_memory_budget is None
    # A publisher's budget would size the loader's memory use; the loader's own default applies.
    published = EditingArguments.from_published({"target_memory_budget": "1KB", "statistics_memory_budget": "1KB"})
    assert published.target_memory_budget == published.statistics_memory_budget == "auto"


def test_auto_is_half_of_the_memory_available_now():
    budget = resolve_memory_budget("auto", torch.device("cpu"))
    available = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemAvailable:"))
    assert budget == pytest.approx(available / 2, rel=0.1)


def test_saved_tensor_bytes_counts_what_backward_keeps_and_not_the_parameters():
    linear = torch.nn.Linear(64, 64)
    inputs = torch.randn(32, 64, requires_grad=True)
    with SavedTensorBytes(exclude=tuple(linear.parameters())) as saved:
        torch.relu(linear(inputs)).sum()
    # Linear keeps its input (32×64 float32); ReLU keeps its output (the same size); the weight is not counted.
    assert saved.bytes == 2 * 32 * 64 * 4


def _optimizer_setup():
    model, tokenizer = tiny_causal_lm("llama"), tiny_tokenizer()
    model.requires_grad_(False)
    spec = resolve_model_spec(model)
    hparams = EditingArguments(v_lr=0.1, v_num_grad_steps=5, layers=[0, 1]).resolve(spec)
    templates = generate_context_templates(model, tokenizer, 6, 3, seed=0)
    records = json.loads((ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-edit.json").read_text())
    return model, tokenizer, spec, hparams, templates, as_edit_requests(records[:6])


@pytest.mark.parametrize("mode", ["prefix_cache", "blocks"])
def test_budgets_down_to_one_request_give_the_unbounded_targets(mode, caplog):
    model, tokenizer, spec, hparams, templates, requests = _optimizer_setup()
    unbounded = TargetOptimizer(model, tokenizer, spec, hparams, templates, mode=mode).optimize(requests)
    probe = TargetOptimizer(model, tokenizer, spec, hparams, templates, mode=mode)
    longest = max((probe.sequences(r) for r in requests), key=lambda p: sum(len(s.ids) for s in p[0]))
    kept, recomputed = probe._probe_bytes(longest)
    assert recomputed < kept
    for budget, checkpointing in ((2 * kept, False), ((kept + recomputed) // 2, True)):
        optimizer = TargetOptimizer(model, tokenizer, spec, hparams, templates, mode=mode, memory_budget=budget)
        with caplog.at_level(logging.INFO, logger="hf_alphaedit"):
            caplog.clear()
            bounded = optimizer.optimize(requests)
        assert optimizer.checkpoint_blocks is checkpointing
        assert ("recomputed in the backward pass" in caplog.text) is checkpointing
        torch.testing.assert_close(bounded.values, unbounded.values, rtol=1e-5, atol=1e-6)
        assert bounded.steps == unbounded.steps


def test_a_budget_below_one_checkpointed_request_warns_and_goes_one_at_a_time(caplog):
    model, tokenizer, spec, hparams, templates, requests = _optimizer_setup()
    unbounded = TargetOptimizer(model, tokenizer, spec, hparams, templates).optimize(requests[:2])
    with caplog.at_level(logging.WARNING, logger="hf_alphaedit"):
        bounded = TargetOptimizer(model, tokenizer, spec, hparams, templates, memory_budget="1KB").optimize(requests[:2])
    assert "more than the memory budget of 1000 B even with activation checkpointing" in caplog.text
    torch.testing.assert_close(bounded.values, unbounded.values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_statistics_batches_within_a_budget_give_the_same_statistics(family, wikitext_lines, caplog):
    model, tokenizer = tiny_causal_lm(family).eval(), tiny_tokenizer()
    spec = resolve_model_spec(model)
    layers = [1, 2]
    whole = collect_key_statistics(model, tokenizer, spec, layers, wikitext_lines, max_length=64,
                                   batch_tokens=10**6, show_progress=False)
    with caplog.at_level(logging.INFO, logger="hf_alphaedit"):
        bounded = collect_key_statistics(model, tokenizer, spec, layers, wikitext_lines, max_length=64,
                                         batch_tokens=10**6, show_progress=False, memory_budget=200_000)
    fitting = int(caplog.text.split("batches of at most ")[1].split()[0])
    assert 64 <= fitting < 200_000 // 1000  # more than 1 KB per token on these models, and at least one sample
    assert bounded.metadata["padded_tokens"] <= whole.metadata["padded_tokens"]
    assert bounded.counts == whole.counts
    for layer in layers:
        torch.testing.assert_close(bounded.sums[layer], whole.sums[layer], rtol=1e-6, atol=1e-6)


def test_a_statistics_budget_below_the_longest_sample_warns_and_goes_one_sample_at_a_time(wikitext_lines, caplog):
    model, tokenizer = tiny_causal_lm("llama").eval(), tiny_tokenizer()
    with caplog.at_level(logging.INFO, logger="hf_alphaedit"):
        collect_key_statistics(model, tokenizer, resolve_model_spec(model), [1], wikitext_lines[:8], max_length=32,
                               batch_tokens=10**6, show_progress=False, memory_budget=1000)
    assert "the longest sample (32 tokens" in caplog.text and "batches of at most 32 tokens" in caplog.text


# The start of both measuring processes: a tiny 8-layer Llama on one thread, and `reset_peak()`, which sets Linux's
# peak RSS (VmHWM) to the current RSS and returns that RSS in KiB.
_PROCESS_START = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from hf_alphaedit.architectures import resolve_model_spec
    from tests.tiny_models import tiny_tokenizer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=128, intermediate_size=512, num_hidden_layers=8,
                                  num_attention_heads=4, num_key_value_heads=4, vocab_size=1024)
    model = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    tokenizer = tiny_tokenizer()
    spec = resolve_model_spec(model)
    def status(field):
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))
    def reset_peak():
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return status("VmRSS")
""")

_PEAK_RSS = _PROCESS_START + textwrap.dedent("""
    from hf_alphaedit import EditingArguments
    from hf_alphaedit.methods.prompts import generate_context_templates
    from hf_alphaedit.methods.targets import TargetOptimizer
    from hf_alphaedit.requests import as_edit_requests

    hparams = EditingArguments(v_num_grad_steps=2, v_early_stop_loss=0, layers=[1, 2]).resolve(spec)
    templates = generate_context_templates(model, tokenizer, 6, 3, seed=0)
    requests = as_edit_requests(json.load(open(sys.argv[1]))[:60])
    budget = None if sys.argv[2] == "none" else sys.argv[2]
    optimizer = TargetOptimizer(model, tokenizer, spec, hparams, templates, batch_tokens=10**9, memory_budget=budget)
    before = reset_peak()
    chunks = []
    optimize_chunk = optimizer._optimize_chunk
    optimizer._optimize_chunk = lambda prepared: chunks.append(len(prepared)) or optimize_chunk(prepared)
    optimizer.optimize(requests)
    print(json.dumps({"extra_mib": (status("VmHWM") - before) / 1024, "checkpointing": optimizer.checkpoint_blocks,
                      "requests_per_micro_batch": chunks}))
""")

_STATISTICS_PEAK_RSS = _PROCESS_START + textwrap.dedent("""
    from hf_alphaedit.statistics import collect_key_statistics

    lines = [line.strip() for line in open(sys.argv[1], encoding="utf-8") if len(line.strip()) > 200][:80]
    budget = None if sys.argv[2] == "none" else int(sys.argv[2])
    before = reset_peak()
    statistics = collect_key_statistics(model, tokenizer, spec, [6, 7], lines, max_length=256, batch_tokens=10**9,
                                        show_progress=False, memory_budget=budget)
    print(json.dumps({"extra_mib": (status("VmHWM") - before) / 1024, "tokens": statistics.metadata["tokens"]}))
""")


def _peak_extra_mib(script: str, data: Path, budget: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(data), budget], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's resettable peak RSS")
def test_the_budget_bounds_the_peak_memory_of_a_process():
    records = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-edit.json"
    unbounded, bounded = _peak_extra_mib(_PEAK_RSS, records, "none"), _peak_extra_mib(_PEAK_RSS, records, "32MiB")
    print(f"memory above the model during target optimisation: {unbounded['extra_mib']:.0f} MiB unbounded, "
          f"{bounded['extra_mib']:.0f} MiB with a 32 MiB budget; micro-batches {bounded['requests_per_micro_batch']}")
    assert unbounded["extra_mib"] > 150
    assert bounded["extra_mib"] < 32 * 1.2 and not bounded["checkpointing"]  # allocator noise


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's resettable peak RSS")
def test_the_statistics_budget_bounds_the_peak_memory_of_a_process():
    corpus = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
    # One sample at a time: what the pass needs whatever the budget (the running sums, the probe, the tokenised
    # corpus, the first use of torch's kernels); the budget bounds what batches add above it.
    floor = _peak_extra_mib(_STATISTICS_PEAK_RSS, corpus, "1")["extra_mib"]
    unbounded = _peak_extra_mib(_STATISTICS_PEAK_RSS, corpus, "none")
    bounded = _peak_extra_mib(_STATISTICS_PEAK_RSS, corpus, str(64 * 2**20))
    print(f"memory above the model during the statistics pass ({bounded['tokens']} tokens): {floor:.0f} MiB one sample "
          f"at a time, {unbounded['extra_mib']:.0f} MiB in one batch, {bounded['extra_mib']:.0f} MiB with a 64 MiB "
          "budget")
    assert unbounded["extra_mib"] - floor > 150
    assert bounded["extra_mib"] - floor < 64
