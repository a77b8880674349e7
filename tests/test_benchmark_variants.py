"""The `--methods` variants of `scripts/benchmark_sequential.py`: the calibration runs' settings reach the right
dataclass, typed, and a typo stops the run before any editing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from hf_alphaedit.methods.ultraedit import UltraEditConfig

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_sequential.py"


@pytest.fixture(scope="module")
def benchmark_script():
    spec = importlib.util.spec_from_file_location("benchmark_sequential", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_settings_go_to_editing_arguments_or_the_method_config(benchmark_script):
    fields, config = benchmark_script.variant_arguments("alphaedit+v_lr_rms_factor=0.5+clamp_norm_factor=0.5")
    assert fields == {"method": "alphaedit", "v_lr_rms_factor": "0.5", "clamp_norm_factor": "0.5"} and config is None
    fields, config = benchmark_script.variant_arguments("ultraedit+lr=1e-4+chunk_size=20+seed=3")
    assert fields == {"method": "ultraedit", "seed": "3"}
    assert isinstance(config, UltraEditConfig) and config.lr == 1e-4 and config.chunk_size == 20
    fields, config = benchmark_script.variant_arguments("memit+prune+mom2_update_weight=2000")
    assert fields == {"method": "memit", "prune": True, "mom2_update_weight": "2000"} and config is None


@pytest.mark.parametrize(("name", "message"), [
    ("ultraedit+learning_rate=1e-4", r"unknown option\(s\) \['learning_rate='\].*EditingArguments and UltraEditConfig"),
    ("ultraedit+lr=-1", r"UltraEditConfig\.lr"),
    ("alphaedit+sparkle", r"unknown option\(s\) \['sparkle'\]"),
    ("alphaedt", r"unknown method"),
])
def test_a_bad_variant_stops_before_editing_and_names_the_field(benchmark_script, name, message):
    with pytest.raises(SystemExit, match=message):
        benchmark_script.variant_arguments(name)
