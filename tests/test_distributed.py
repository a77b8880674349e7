"""Data-parallel statistics: `torchrun --nproc_per_node 2 -m hf_alphaedit stats` on CPUs (gloo) against one process.

The two-rank runs start real processes through `torchrun` (`tests/distributed_cli.py` is `python -m hf_alphaedit`
that can make one rank die); the single-process run is the same command in this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_alphaedit.artifacts import (
    ARTIFACT_CONFIG,
    read_artifact_config,
    read_artifact_tensors,
    statistics_path,
)
from hf_alphaedit.cli import main
from hf_alphaedit.distributed import DataParallel
from tests.tiny_models import tiny_causal_lm, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
LAYERS = (1, 2)
TORCHRUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def config(tmp_path_factory, corpus_file) -> Path:
    """A tiny Llama folder, conftest's 60 corpus lines (~70 statistics batches of 256 tokens) and a `stats` config."""
    root = tmp_path_factory.mktemp("distributed")
    tiny_causal_lm("llama").save_pretrained(root / "tiny")
    tiny_tokenizer().save_pretrained(root / "tiny")
    (root / "config.yaml").write_text(
        f"model_name_or_path: {root / 'tiny'}\nstatistics_corpus: {corpus_file}\nstatistics_samples: 60\n"
        f"statistics_batch_tokens: 256\nlayers: [1, 2]\nnullspace_threshold: 1e-2\nprojection: compute\n"
        "device: cpu\nquiet: true\n", encoding="utf-8")
    return root / "config.yaml"


def _torchrun(config: Path, output_dir: Path, cache_dir: Path, *failure: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "tests" / "distributed_cli.py"), *failure, "stats", "--config", str(config),
               "--output_dir", str(output_dir), "--statistics_cache_dir", str(cache_dir)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S, env=environment,
                          check=False)


def _statistics(artifact: Path) -> dict[int, dict[str, torch.Tensor]]:
    config = read_artifact_config(artifact)
    return {layer: read_artifact_tensors(artifact, statistics_path(layer), config) for layer in LAYERS}


def test_two_ranks_write_the_artifact_of_one_process(config, tmp_path, capsys):
    single, double = tmp_path / "single", tmp_path / "double"
    assert main(["stats", "--config", str(config), "--output_dir", str(single), "--statistics_cache_dir",
                 str(tmp_path / "cache-single")]) == 0
    assert "processes" not in capsys.readouterr().out
    run = _torchrun(config, double, tmp_path / "cache-double")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("key statistics") == 1 and "processes" in run.stdout  # rank 0 alone reports
    one, two = _statistics(single), _statistics(double)
    for layer in LAYERS:
        assert one[layer].keys() == two[layer].keys()
        for name, tensor in one[layer].items():
            # Same float32 shard sums, added in another order in float64.
            torch.testing.assert_close(two[layer][name], tensor, rtol=1e-12, atol=0, msg=f"{layer}/{name}")
    assert read_artifact_config(single)["layers"] == read_artifact_config(double)["layers"] == list(LAYERS)


def test_a_rank_that_dies_fails_the_run_without_an_artifact(config, tmp_path):
    output_dir = tmp_path / "artifact"  # rank 1 is SIGKILLed in its first statistics batch (an OOM kill)
    run = _torchrun(config, output_dir, tmp_path / "cache", "--kill_rank", "1")
    assert run.returncode != 0
    assert "rank      : 1" in run.stderr and "SIGKILL" in run.stderr  # torchrun names the rank and the cause
    assert not (output_dir / ARTIFACT_CONFIG).exists()
    assert not list((tmp_path / "cache").glob("*.safetensors"))  # nor partial statistics in the cache


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_ranks_split_the_shards_without_overlap_or_gap(world_size):
    for count in (0, 1, 4, 7, 64):
        ranks = [list(DataParallel(rank, world_size, torch.device("cpu")).shard(count)) for rank in range(world_size)]
        assert sorted(unit for units in ranks for unit in units) == list(range(count))
