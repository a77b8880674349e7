"""Sequential editing runs that survive being killed: `save_steps`, `resume_from_checkpoint`, the output-dir guard.

`edit_sequentially(editor, requests)` applies the requests batch after batch (`EditingArguments.batch_size`) and,
every `save_steps` batches, writes a checkpoint into `output_dir`:

    run.json                        what the run is: model, digest of the requests, every setting that changes results
    latest                          the name of the newest complete checkpoint (replaced after that checkpoint exists)
    checkpoint-000004/              the run after 4 batches
        checkpoint.json             batches done, the forward mode editing used, the run identity
        edit_state.safetensors/json the `EditState`: per-batch factors, keys and requests, the context templates
        edited_weights.safetensors  the edited matrices' weights (and float32 masters of low-precision weights)

A checkpoint is written into a hidden staging folder and renamed into place, then `latest` is replaced (also by
rename), then the oldest checkpoints beyond `save_total_limit` (default 1: all older ones) are renamed away and
deleted; a process killed at any moment therefore leaves either the previous or the new checkpoint complete. A
checkpoint also continues a longer run whose first batches it holds (a finished run extended by more edits).
Resuming loads the base model, builds the method on the unedited weights (as the uninterrupted run did: statistics,
NSE's and PRUNE's copies of the originals), then copies the saved weights in and rebuilds the method's sequential
state (e.g. AlphaEdit's previous-edit Gram) by re-committing the saved batches in order. Saved weights rather than
re-added factors, because only they are bitwise what the uninterrupted run had (re-adding factors differs by
round-off under PRUNE or low precision).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .arguments import SIDE_EFFECT_FIELDS
from .engine import EditResult
from .fingerprint import records_sha256
from .requests import EditRequest, as_edit_requests
from .state import EditState

if TYPE_CHECKING:
    from .modeling import AlphaEditModel

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
LATEST_FILE = "latest"
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_FILE = "checkpoint.json"
WEIGHTS_FILE = "edited_weights.safetensors"
# Where the CLI saves the finished run's edited model (a `save_pretrained` folder) inside output_dir.
FINAL_MODEL_DIR = "edited_model"
CHECKPOINT_FORMAT_VERSION = 2  # 2: weights keyed by module name (1: by the layer of the rewrite module)
_STAGING_PREFIX = ".tmp-"
# Settings that do not change what a run computes: they may differ between a run and its resumption. The memory
# budgets act on the machine too, but they set the micro-batches whose sums round differently, so they stay.
_RUN_INDEPENDENT_ARGS = frozenset(SIDE_EFFECT_FIELDS) - {"target_memory_budget", "statistics_memory_budget"}


class CheckpointError(ValueError):
    """A checkpoint or output directory that cannot be used for this run (says why and what to do)."""


@dataclass
class Checkpoint:
    """A checkpoint read back: the edit state after `num_batches` batches and the edited layers' weights."""

    path: Path
    num_batches: int
    state: EditState
    weights: dict[str, torch.Tensor]  # module -> edited weight as the model stores it
    masters: dict[str, torch.Tensor]  # module -> float32 master of a low-precision weight
    forward_mode: str | None
    run: dict[str, Any]


@dataclass
class SequentialRun:
    """What `edit_sequentially` did: reports of the batches it edited and where it started and saved."""

    result: EditResult
    num_batches: int  # batches of the whole run, including those restored from a checkpoint
    resumed_from: Path | None = None
    resumed_batches: int = 0
    last_checkpoint: Path | None = None


def edit_sequentially(editor: AlphaEditModel, requests: EditRequest | Mapping | Iterable[EditRequest | Mapping],
                      *, show_progress: bool | None = None) -> SequentialRun:
    """Edit `requests` in batches of `editing_args.batch_size` with checkpoints and resumption.

    Every request is validated before anything is edited or written. With `editing_args.save_steps` a checkpoint
    is written into `output_dir` every that many batches; `resume_from_checkpoint` (a checkpoint folder, or
    `"true"` for the latest in `output_dir`) continues a run with the same model, requests and settings, ending
    with weights bitwise identical to an uninterrupted run. `output_dir` must not hold a different run unless
    `overwrite_output_dir`. `show_progress=None` shows the batch bar on a terminal unless `disable_tqdm`.
    """
    args = editor.editing_args
    size = args.batch_size
    requests = as_edit_requests(requests, batch_size=size)
    if not requests:
        raise ValueError("no edit requests: give at least one record.")
    batches = [requests[i: i + size] for i in range(0, len(requests), size)]
    output_dir = Path(args.output_dir).expanduser() if args.output_dir else None
    if output_dir is None and (args.save_steps or args.resume_from_checkpoint == "true"):
        flag = "save_steps" if args.save_steps else "resume_from_checkpoint=true"
        raise CheckpointError(f"EditingArguments.{flag} needs output_dir (where checkpoints are written); set "
                              "output_dir (--output_dir).")
    run = run_identity(editor, requests)
    resume = _checkpoint_to_resume(args.resume_from_checkpoint, output_dir)
    if output_dir is not None:
        if resume is not None and args.overwrite_output_dir and output_dir.resolve() in resume.resolve().parents:
            raise CheckpointError(f"resume_from_checkpoint={str(resume)!r} lies in output_dir, which "
                                  "overwrite_output_dir would clear; pass one of them.")
        prepare_output_dir(output_dir, run, resuming=args.resume_from_checkpoint is not None,
                           overwrite=args.overwrite_output_dir)
    outcome = SequentialRun(EditResult(), len(batches))
    if resume is not None:
        checkpoint = load_checkpoint(resume)
        restore_checkpoint(editor, checkpoint, run, requests)
        outcome.resumed_from, outcome.resumed_batches = resume, checkpoint.num_batches
        logger.info("resumed from %s: %d of %d batches already done", resume, checkpoint.num_batches, len(batches))
    if show_progress is None and args.disable_tqdm:
        show_progress = False
    with tqdm(total=len(batches), initial=outcome.resumed_batches, desc="batches", unit="batch",
              disable=None if show_progress is None else not show_progress) as bar:
        for index in range(outcome.resumed_batches, len(batches)):
            outcome.result.batches.extend(editor.edit(batches[index], batch_size=len(batches[index])).batches)
            if args.save_steps and (index + 1) % args.save_steps == 0:
                outcome.last_checkpoint = save_checkpoint(editor, output_dir, run, keep=args.save_total_limit)
            bar.update(1)
    return outcome


# -- the run's identity and the output directory ------------------------------------------------------------------


def run_identity(editor: AlphaEditModel, requests: Sequence[EditRequest]) -> dict[str, Any]:
    """JSON-ready description of a run: the model, a digest of the requests and the settings that change results."""
    source = editor.source
    config = editor.method_config
    identity = {
        "model": {"name_or_path": source.name_or_path, "revision": source.revision, "commit_sha": source.commit_sha},
        "requests": {"count": len(requests), "sha256": records_sha256([r.to_dict() for r in requests])},
        "editing_args": {k: v for k, v in editor.editing_args.to_dict().items() if k not in _RUN_INDEPENDENT_ARGS},
        "method_config": config.to_dict() if config is not None else None,
        # The values the unset arguments resolved to: a version with other defaults must not continue the run.
        "hyperparameters": editor.hparams.to_dict(),
    }
    return json.loads(json.dumps(identity, default=str))  # as it reads back from run.json (tuples become lists)


def prepare_output_dir(output_dir: Path, run: dict[str, Any], *, resuming: bool, overwrite: bool) -> None:
    """Check that `output_dir` may receive this run, clear what an earlier run left when allowed, write run.json.

    Refused unless `overwrite`: a folder of other files, a different run's folder, or this run's folder with
    checkpoints or an edited model when not `resuming` (the work would be redone and replaced silently).
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise CheckpointError(f"output_dir {str(output_dir)!r} is a file; give a directory.")
    output_dir.mkdir(parents=True, exist_ok=True)
    run_file = output_dir / RUN_FILE
    saved = _read_json(run_file) if run_file.is_file() else None
    if any(not entry.name.startswith(_STAGING_PREFIX) for entry in output_dir.iterdir()) and not overwrite:
        if saved is None:
            raise CheckpointError(f"output_dir {str(output_dir)!r} is not empty and holds no {RUN_FILE} of an "
                                  "hf_alphaedit run; choose an empty or new output_dir, or set overwrite_output_dir "
                                  "(--overwrite_output_dir) to write into it anyway.")
        differences = _differences(saved, run)
        if differences:
            raise CheckpointError(f"output_dir {str(output_dir)!r} already holds a different run ("
                                  f"{'; '.join(differences[:5])}); choose another output_dir, or set "
                                  "overwrite_output_dir (--overwrite_output_dir) to replace it.")
        done = [entry.name for entry in checkpoint_folders(output_dir)]
        if (output_dir / FINAL_MODEL_DIR).exists():
            done.append(FINAL_MODEL_DIR)
        if done and not resuming:
            raise CheckpointError(f"output_dir {str(output_dir)!r} already holds this run ({', '.join(done)}); "
                                  "set resume_from_checkpoint=true (--resume_from_checkpoint true) to continue it, or "
                                  "overwrite_output_dir (--overwrite_output_dir) to start it over.")
    for entry in output_dir.iterdir():
        ours = entry.name in (RUN_FILE, LATEST_FILE, FINAL_MODEL_DIR) or _is_checkpoint_name(entry.name)
        if entry.name.startswith(_STAGING_PREFIX) or (overwrite and ours):
            _discard(entry)
    _atomic_write_text(run_file, json.dumps(run, indent=2) + "\n")


def _differences(saved: Any, current: Any, where: str = "") -> list[str]:
    """Human-readable `key: saved -> current` lines for every leaf where two JSON values differ."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [line for key in sorted(set(saved) | set(current), key=str)
                for line in _differences(saved.get(key), current.get(key), f"{where}.{key}" if where else key)]
    return [] if saved == current else [f"{where}: {saved!r} -> {current!r}"]


def _check_same_run(saved: dict[str, Any], current: dict[str, Any], what: str, *, requests_checked: bool) -> None:
    """Refuse `saved` (a checkpoint's run identity) unless it is `current`'s; `requests_checked`: the requests
    are compared batch by batch (`_check_batches_lead`), so the runs' request digests may differ."""
    if requests_checked:
        saved, current = ({key: value for key, value in identity.items() if key != "requests"}
                          for identity in (saved, current))
    if "hyperparameters" not in saved:
        logger.warning("%s was written before checkpoints recorded the resolved hyperparameters: the arguments match, "
                       "but if a default of hf_alphaedit changed since, its later batches edit with the new one.", what)
        current = {key: value for key, value in current.items() if key != "hyperparameters"}
    differences = _differences(saved, current)
    if differences:
        raise CheckpointError(f"{what} belongs to a different run ({'; '.join(differences[:5])}); resume with the "
                              "same model, requests and settings, or start a new run without resume_from_checkpoint.")


# -- writing and reading checkpoints ------------------------------------------------------------------------------


def save_checkpoint(editor: AlphaEditModel, output_dir: Path, run: dict[str, Any], *, keep: int | None = 1) -> Path:
    """Write `checkpoint-<batches done>` into `output_dir` atomically, point `latest` at it, and delete the oldest
    checkpoints beyond the newest `keep` (None keeps all)."""
    name = f"{CHECKPOINT_PREFIX}{len(editor.state.batches):06d}"
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=output_dir))
    target = output_dir / name
    try:
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a checkpoint is as readable as any output
        editor.state.save(staging)
        weights, masters = editor.engine.edited_tensors()
        tensors = {f"{module}:weight": weight.contiguous() for module, weight in weights.items()}
        tensors.update({f"{module}:master": master.contiguous() for module, master in masters.items()})
        save_file(tensors, str(staging / WEIGHTS_FILE))
        meta = {"format_version": CHECKPOINT_FORMAT_VERSION, "num_batches": len(editor.state.batches),
                "num_edits": editor.state.num_edits, "forward_mode": editor.forward_mode, "run": run}
        (staging / CHECKPOINT_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if target.exists():  # written before a kill that came before `latest` moved to it
            _discard(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _atomic_write_text(output_dir / LATEST_FILE, name + "\n")
    if keep is not None:
        older = [entry for entry in checkpoint_folders(output_dir) if entry.name != name]
        for entry in older[: max(len(older) - keep + 1, 0)]:
            _discard(entry)
    logger.info("checkpoint %s: %d batches, %d edits", target, len(editor.state.batches), editor.state.num_edits)
    return target


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint `latest` names, else the newest checkpoint folder (complete by construction), else None."""
    pointer = output_dir / LATEST_FILE
    if pointer.is_file():
        named = output_dir / pointer.read_text(encoding="utf-8").strip()
        if (named / CHECKPOINT_FILE).is_file():
            return named
    candidates = checkpoint_folders(output_dir)
    return candidates[-1] if candidates else None


def checkpoint_folders(output_dir: Path) -> list[Path]:
    """Checkpoint folders of `output_dir`, oldest first."""
    found = [entry for entry in output_dir.iterdir() if _is_checkpoint_name(entry.name) and entry.is_dir()]
    return sorted(found, key=lambda entry: int(entry.name.removeprefix(CHECKPOINT_PREFIX)))


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint folder written by `save_checkpoint`."""
    path = Path(path).expanduser()
    meta_file = path / CHECKPOINT_FILE
    if not meta_file.is_file():
        raise CheckpointError(f"resume_from_checkpoint={str(path)!r} is not a checkpoint of hf_alphaedit (no "
                              f"{CHECKPOINT_FILE}); give a {CHECKPOINT_PREFIX}<n> folder or 'true' for the latest.")
    meta = _read_json(meta_file)
    if meta.get("format_version", 0) > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(f"{meta_file}: checkpoint format {meta.get('format_version')} is newer than this "
                              f"version of hf_alphaedit reads ({CHECKPOINT_FORMAT_VERSION}); upgrade hf_alphaedit.")
    tensors = load_file(str(path / WEIGHTS_FILE))
    weights, masters = {}, {}
    for key, tensor in tensors.items():
        module, _, kind = key.rpartition(":") if meta.get("format_version", 1) >= 2 else _legacy_key(key)
        (weights if kind == "weight" else masters)[module] = tensor
    return Checkpoint(path, meta["num_batches"], EditState.load(path), weights, masters, meta.get("forward_mode"),
                      meta["run"])


def _legacy_key(key: str) -> tuple[str, str, str]:
    """`layer5.weight` (format 1) as `("layer:5", "", "weight")`; `restore_checkpoint` maps the layer to its module."""
    layer, kind = key.removeprefix("layer").split(".")
    return f"layer:{layer}", "", kind


def restore_checkpoint(editor: AlphaEditModel, checkpoint: Checkpoint, run: dict[str, Any] | None = None,
                       requests: Sequence[EditRequest] | None = None) -> None:
    """Put `editor` (freshly loaded, unedited) exactly in the state the checkpoint recorded; with `run`
    (`run_identity` of the run being continued), first refuse a checkpoint of another run.

    With the run's `requests` too, a checkpoint of a run with other requests after its batches is accepted when its
    batches are exactly the first batches of `requests` (in `editing_args.batch_size`): later requests never change
    an earlier batch, so continuing it ends where the uninterrupted run of `requests` would. That is how a lifelong
    run is extended by more edits, or a longer run's checkpoint starts a shorter one.
    """
    if run is not None:
        _check_same_run(checkpoint.run, run, f"checkpoint {checkpoint.path}", requests_checked=requests is not None)
    if requests is not None:
        _check_batches_lead(checkpoint, requests, editor.editing_args.batch_size)
    state = checkpoint.state
    if editor.state.batches:
        raise CheckpointError("resume_from_checkpoint: the model already carries edits; resume onto the unedited "
                              "base model.")
    if state.method != editor.state.method or list(state.layers) != list(editor.state.layers):
        raise CheckpointError(f"checkpoint {checkpoint.path} was made with method {state.method!r} at layers "
                              f"{state.layers}, not {editor.state.method!r} at {editor.state.layers}.")
    weights = {_module_of(editor, key): value for key, value in checkpoint.weights.items()}
    masters = {_module_of(editor, key): value for key, value in checkpoint.masters.items()}
    if len(state.batches) != checkpoint.num_batches or not weights:
        raise CheckpointError(f"checkpoint {checkpoint.path} is inconsistent ({len(state.batches)} saved batches "
                              f"for {checkpoint.num_batches} done, weights of {sorted(weights)}); resume from "
                              "another checkpoint.")
    editor.engine.forward_mode = checkpoint.forward_mode
    editor.state.context_templates[:] = state.context_templates  # the method's context holds this very list
    with editor.engine.editing_mode():
        _ = editor.method  # built on the unedited weights, exactly as the uninterrupted run built it
    editor.engine.restore(weights, masters, state.batches)


def _check_batches_lead(checkpoint: Checkpoint, requests: Sequence[EditRequest], batch_size: int) -> None:
    """Refuse `checkpoint` unless its batches are the first batches of `requests` (batches of `batch_size`)."""
    if checkpoint.num_batches > -(-len(requests) // batch_size):  # more batches than the requests make
        raise CheckpointError(f"checkpoint {checkpoint.path} holds {checkpoint.num_batches} batches, more than this "
                              f"run's {len(requests)} requests make; resume a run at least that long.")
    for index, batch in enumerate(checkpoint.state.batches):
        expected = list(requests[index * batch_size: (index + 1) * batch_size])
        if list(batch.requests) != expected:
            raise CheckpointError(f"checkpoint {checkpoint.path} belongs to a different run: its batch {index} edited "
                                  f"other requests than this run's batch {index} (requests "
                                  f"{index * batch_size}-{(index + 1) * batch_size - 1}); a checkpoint continues "
                                  "only a run whose first batches it holds, in the same order.")


def _module_of(editor: AlphaEditModel, key: str) -> str:
    return editor.spec.rewrite_module_name(int(key.removeprefix("layer:"))) if key.startswith("layer:") else key


def _checkpoint_to_resume(value: str | None, output_dir: Path | None) -> Path | None:
    """The checkpoint folder `resume_from_checkpoint` names (None: start from the first batch)."""
    if value is None:
        return None
    if value != "true":
        path = Path(value).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"resume_from_checkpoint={value!r}: no such folder; give a checkpoint folder "
                                    "or 'true' for the latest checkpoint in output_dir.")
        return path
    found = latest_checkpoint(output_dir) if output_dir is not None and output_dir.is_dir() else None
    if found is None:
        logger.warning("resume_from_checkpoint=true: %s holds no checkpoint yet; starting from the first batch",
                       output_dir)
    return found


def _is_checkpoint_name(name: str) -> bool:
    return name.startswith(CHECKPOINT_PREFIX) and name.removeprefix(CHECKPOINT_PREFIX).isdigit()


def _discard(path: Path) -> None:
    """Remove `path`; folders are first renamed to a staging name, so they never exist half-deleted."""
    if path.is_dir() and not path.name.startswith(_STAGING_PREFIX):
        hidden = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=path.parent))
        os.replace(path, hidden / path.name)
        path = hidden
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _atomic_write_text(path: Path, text: str) -> None:
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{_STAGING_PREFIX}{path.name}.")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); it was not written by hf_alphaedit.") from None

