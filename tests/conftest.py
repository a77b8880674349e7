"""Shared fixtures: the local Hub emulator, the shared data folder and the real SmolLM2 model.

Every Hugging Face library in the test session talks to :class:`tests.hub_server.HubServer` on
127.0.0.1, never to huggingface.co, and caches into a temporary ``HF_HOME`` removed at exit.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from tests.hub_server import HubServer

if TYPE_CHECKING:  # imported lazily below: the environment must be set before any Hugging Face import
    from huggingface_hub import HfApi

# pytest imports this file as `conftest`; importing it again under another name (`from tests.conftest import ...`)
# would run it twice: a second Hub emulator and HF_HOME in the environment, which subprocesses and late-imported
# libraries then use while the libraries imported earlier keep the first (CI failed on exactly that: repos pushed
# to one emulator were looked up on the other). Share values through fixtures instead.
if any(getattr(module, "__file__", None) == __file__ for name, module in list(sys.modules.items()) if name != __name__):
    raise ImportError(f"{__file__} is already imported; take its values from fixtures, not `from tests.conftest import`")

# Set before any Hugging Face library is imported: several of these are read only at import time
# (HUB_INTEGRATION.md §0 and §1.4), and the endpoint is copied into constants by every library.
_HUB = HubServer().start()
_HF_HOME = tempfile.mkdtemp(prefix="hf_alphaedit_tests_hf_home_")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
atexit.register(_HUB.shutdown)
os.environ["HF_ENDPOINT"] = _HUB.endpoint
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_TOKEN"] = "hf_dummy_token_for_the_local_hub_emulator"
# Cache locations set explicitly would win over HF_HOME and mix emulator repos with real ones.
for _variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "HF_MODULES_CACHE"):
    os.environ.pop(_variable, None)
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_UPDATE_DOWNLOAD_COUNTS"] = "false"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tiny models run on one thread for the whole session (module fixtures included): their matrices are so small that a
# second OpenMP thread only adds synchronisation, which on a 2-core machine with anything else running made their
# forward passes 10x slower (20 s instead of 1.4 s for the context templates of one editor).
_ALL_THREADS = torch.get_num_threads()
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _torch_threads(request: pytest.FixtureRequest) -> Iterator[None]:
    """The real model's tests (``slow``) on every core; everything else on one thread (see ``_ALL_THREADS``)."""
    slow = request.node.get_closest_marker("slow") is not None
    torch.set_num_threads(_ALL_THREADS if slow else 1)
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def hub_server() -> HubServer:
    """The Hub emulator that ``HF_ENDPOINT`` points to (one per session; repos persist across tests)."""
    return _HUB


@pytest.fixture
def hub_api() -> HfApi:
    """An ``HfApi()`` for the emulator (endpoint and dummy token from the environment)."""
    from huggingface_hub import HfApi

    return HfApi()


@pytest.fixture
def unique_repo_id() -> Callable[[str], str]:
    """``make(name) -> "tester/<name>-<8 hex>"``: repo ids no other test (or earlier call) uses."""

    def make(name: str) -> str:
        return f"tester/{name}-{uuid.uuid4().hex[:8]}"

    return make


@pytest.fixture
def fresh_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hub cache for this test, so that downloads start from nothing; returns its path.

    huggingface_hub reads ``HF_HUB_CACHE`` at import into ``constants.HF_HUB_CACHE`` (consulted at call
    time by hf_hub_download, snapshot_download and transformers) and its cache scanner keeps a copy.
    """
    import huggingface_hub.constants
    import huggingface_hub.utils._cache_manager

    cache = tmp_path / "hf_hub_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.utils._cache_manager, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data sets (``../shared/data`` next to the project root)."""
    return Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture()
def wikitext_lines(shared_data: Path) -> list[str]:
    """The first 60 non-empty WikiText-2 validation lines (stripped)."""
    lines = (shared_data / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()][:60]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """`corpus.txt` (the first 60 non-empty WikiText-2 validation lines) in a folder of its own for the test module,
    so a statistics cache next to it serves the whole module."""
    lines = (shared_data / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").splitlines()
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join([line.strip() for line in lines if line.strip()][:60]), encoding="utf-8")
    return path


@pytest.fixture()
def corpus(tmp_path: Path, wikitext_lines: list[str]) -> Path:
    """A folder with ``corpus.txt`` (the lines of ``wikitext_lines``): the statistics corpus of the tiny-model
    tests (``tests.test_engine._args``)."""
    (tmp_path / "corpus.txt").write_text("\n".join(wikitext_lines), encoding="utf-8")
    return tmp_path


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cache root for the converted SmolLM2: ``$HF_ALPHAEDIT_CACHE`` if set (kept between runs), else a temp dir."""
    existing = os.environ.get("HF_ALPHAEDIT_CACHE")
    return Path(existing) if existing else tmp_path_factory.mktemp("hf_alphaedit_cache")


@pytest.fixture(scope="session")
def smollm2(smollm2_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    """``(model, tokenizer)`` of the embedded SmolLM2-135M-Instruct (dequantized Q4_1), loaded once per session.

    Loaded offline with an empty Hub cache, so every machine tests the same weights. The model is
    shared by all tests: restore any weight you change.
    """
    from hf_alphaedit.hub import DEFAULT_MODEL, load_model_and_tokenizer

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_ALPHAEDIT_CACHE", str(smollm2_cache))
        model, tokenizer, _ = load_model_and_tokenizer(
            DEFAULT_MODEL, cache_dir=str(tmp_path_factory.mktemp("empty_hub_cache"))
        )
    return model, tokenizer


# WikiText-2 lines behind the real model's key statistics in tests: collecting them takes about a minute on two
# cores (1,000 lines took three), and every SmolLM2 test shares the one cached collection.
SMOLLM2_STATISTICS_SAMPLES = 300


@pytest.fixture(scope="session")
def smollm2_statistics_samples() -> int:
    """``SMOLLM2_STATISTICS_SAMPLES``, for tests that pass the sample size to the CLI themselves."""
    return SMOLLM2_STATISTICS_SAMPLES


@pytest.fixture(scope="session")
def smollm2_statistics_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The statistics cache every SmolLM2 test shares (collected by whichever test needs it first)."""
    return tmp_path_factory.mktemp("smollm2-statistics")


@pytest.fixture()
def smollm2_editor(smollm2, shared_data: Path, smollm2_statistics_dir: Path):
    """``build(method="alphaedit", method_config=None, **editing_arguments) -> AlphaEditModel`` on the shared
    SmolLM2, with WikiText-2 key statistics (``SMOLLM2_STATISTICS_SAMPLES`` lines unless ``statistics_samples``
    says otherwise) cached once per session; the shared model's weights are restored afterwards."""
    from hf_alphaedit import AlphaEditModel, EditingArguments

    model, tokenizer = smollm2
    original = {k: v.clone() for k, v in model.state_dict().items()}

    def build(method: str = "alphaedit", method_config=None, **overrides) -> AlphaEditModel:
        overrides = {"statistics_samples": SMOLLM2_STATISTICS_SAMPLES, **overrides}
        args = EditingArguments(method=method, statistics_corpus=str(shared_data / "wikitext-2" / "valid.txt"),
                                disable_tqdm=True, statistics_cache_dir=str(smollm2_statistics_dir), **overrides)
        return AlphaEditModel(model, tokenizer, args, method_config=method_config)

    yield build
    model.load_state_dict(original)


def pytest_terminal_summary(terminalreporter) -> None:
    """Say why the browser tests were skipped, also under `-q` (where skip reasons are not listed)."""
    skipped = [report for report in terminalreporter.stats.get("skipped", []) if "browser" in report.keywords]
    if skipped:
        from tests.space_browser import browser_unavailable

        terminalreporter.write_line(f"{len(skipped)} browser test(s) skipped: {browser_unavailable()}")
