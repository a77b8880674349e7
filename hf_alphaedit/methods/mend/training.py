"""Training a MEND editor the way a Hugging Face user trains anything: `MendTrainingArguments` + `MendTrainer`.

`MendTrainer` is a `transformers.Trainer` whose model is the editor (the only trained parameters) and whose loss is
MEND's inner edit step (ALGORITHMS.md §8.5): one forward/backward of the frozen base model on a batch of edit inputs
gives the gradient factors, the editor turns them into updates, and a second, functional forward of the edited
model scores the outer inputs (edit NLL) and the locality inputs (KL against the unedited model). Trainer can
express that step because it only needs `compute_loss`: the inner backward is `torch.autograd.grad` with respect to
activations, not a second optimizer, so gradient accumulation, clipping, logging, evaluation, early stopping,
checkpoints and resuming are Trainer's own.

A training example ("episode") is one batch edit of `edits_per_batch` records, grouped once by a seeded shuffle;
`per_device_train_batch_size` counts episodes per step. Because the groups are fixed, the blocks below the editor's
first block (which no edit changes) can run once per episode and be kept for later epochs
(`cache_lower_blocks=true`): on SmolLM2 with the last three of 30 blocks edited, an epoch after the first then costs
about a fifth of it.

Data are the flat CounterFact and MEND-format ZsRE training files (ALGORITHMS.md §8.6, §12.2-12.3), read through
`datasets`; the validation split is held out from them. Checkpoints are editor folders (`model.safetensors`,
`mend_editor.json`, card) plus Trainer's optimizer, scheduler and RNG state for resuming; the final editor folder
and its Hub push hold the editor only.

    hf-alphaedit train-mend --config examples/configs/mend-smollm2.yaml
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments
from transformers.trainer_utils import EvalLoopOutput

from ...architectures import resolve_model_spec
from ...fields import setting, validate_fields
from ...hub import DEFAULT_MODEL, load_model_and_tokenizer, public_path
from .editor import DEFAULT_INNER_BLOCKS, MendEditor, default_inner_modules
from .functional import (
    EditEpisode,
    EncodedBatch,
    MendLosses,
    blocks_match_full_model,
    encode_continuations,
    mend_losses,
)

logger = logging.getLogger(__name__)

OUTER_PROMPTS = ("rephrase", "prompt", "both")
ZSRE_TARGETS = ("alt", "answers")
EDITOR_DIR = "editor"
_BATCH_PARTS = ("edit", "outer", "locality")
# Settings recorded in the editor's config and card (besides the editor's own size).
_RECORDED_ARGUMENTS = (
    "learning_rate", "step_size_learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
    "max_steps", "num_train_epochs", "edit_loss_weight", "locality_loss_weight", "outer_prompts", "max_grad_norm",
    "lr_scheduler_type", "warmup_steps", "weight_decay", "eval_steps", "early_stopping_patience", "seed",
    "model_dtype", "zsre_target", "edits_per_batch")


@dataclass
class MendTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus what MEND needs: the base model, the training files, the editor and the objective.

    Works with `HfArgumentParser` (every field is a flag) and YAML / JSON configs (values are converted as flags
    are). `learning_rate` is the editor networks' Adam step (the reference's `lr`), `step_size_learning_rate` the
    step sizes' (`lr_lr`). `push_to_hub` is refused: Trainer would upload its checkpoints with optimizer state;
    `push_editor_to_hub` uploads the editor alone. `resume_from_checkpoint: true` continues from the last checkpoint
    in `output_dir`.
    """

    model_name_or_path: str = setting("Base model (Hub id or local folder) the editor is trained for.",
                                    default=DEFAULT_MODEL)
    edits_per_batch: int = setting(
        "Records edited together in one training example (one batch edit; the reference trains with 1). "
        "per_device_train_batch_size / per_device_eval_batch_size count such examples.", default=8, low=1)
    cache_lower_blocks: bool = setting(
        "Keep each example's hidden states at the editor's first block (and the arguments every block is called "
        "with) in memory after its first use, so later epochs and evaluations skip the blocks below (about 0.1 MB "
        "per record on SmolLM2).", default=False)
    model_revision: str | None = setting("Revision of a Hub base model.", default=None)
    model_dtype: Literal["float32", "bfloat16", "float16"] = setting(
        "Dtype of the base model. float32 is recommended: in lower precision small updates are rounded away.",
        default="float32")
    train_files: list[str] = setting(
        "Training records: flat CounterFact (prompt, target_new, rephrase_prompt, locality_prompt, "
        "locality_ground_truth) and/or MEND-format ZsRE (src, alt, answers, rephrase, loc, loc_ans) .json/.jsonl "
        "files, or Hub dataset names; never the evaluation records.", default_factory=list)
    zsre_target: Literal["alt", "answers"] = setting(
        "ZsRE records: edit towards 'alt' (a counterfactual answer, EasyEdit) or 'answers' (answers[0]).",
        default="alt")
    validation_size: int = setting("Records held out from train_files for validation (early stopping, metrics).",
                                   default=500, low=1)
    max_train_records: int | None = setting("Use at most this many training records (after the split).",
                                            default=None, low=1)
    inner_modules: list[str] | None = setting(
        "Dotted paths of the matrices the editor edits. Default: every MLP matrix of the last inner_blocks blocks.",
        default=None)
    inner_blocks: int = setting("How many of the last blocks the default inner matrices come from.",
                                default=DEFAULT_INNER_BLOCKS, low=1)
    editor_rank: int = setting("Rank of each low-rank layer of the editor networks (the reference uses 1920).",
                               default=1920, low=1)
    editor_n_hidden: int = setting("Hidden layers of the editor networks (n_hidden + 1 residual layers).",
                                   default=1, low=0)
    editor_normalize: bool = setting("Standardise the networks' inputs with running statistics.", default=True)
    initial_step_size: float = setting("Initial value of every learned step size (the reference's edit_lr).",
                                       default=1e-4, low=0, low_open=True)
    step_size_learning_rate: float = setting("Adam learning rate of the step sizes (the reference's lr_lr).",
                                             default=1e-4, low=0, low_open=True)
    edit_loss_weight: float = setting("Weight of the edit loss (c_edit).", default=0.1, low=0)
    locality_loss_weight: float = setting("Weight of the locality KL (c_loc).", default=1.0, low=0)
    outer_prompts: Literal["rephrase", "prompt", "both"] = setting(
        "Inputs the edit loss is measured on after the edit: the paraphrase (original MEND), the edit prompt "
        "itself (EasyEdit), or both.", default="rephrase")
    early_stopping_patience: int | None = setting(
        "Stop after this many evaluations without improvement of metric_for_best_model (needs "
        "load_best_model_at_end=true).", default=None, low=1)
    editor_dir: str | None = setting(f"Where the trained editor is saved. Default: <output_dir>/{EDITOR_DIR}.",
                                   default=None)
    push_editor_to_hub: bool = setting("Push the trained editor (weights, config, card; no optimizer state) to "
                                     "editor_repo_id.", default=False)
    editor_repo_id: str | None = setting("Hub repo the trained editor is pushed to.", default=None)

    def __post_init__(self) -> None:
        # YAML / JSON values arrive unconverted ('1e-4' stays a string), as for every hf_alphaedit config.
        validate_fields(self)
        for name in ("output_dir", "editor_dir"):
            if getattr(self, name) is not None:
                setattr(self, name, os.path.expanduser(getattr(self, name)))
        if isinstance(self.train_files, str):
            self.train_files = [self.train_files]
        if not self.train_files:
            raise ValueError("MendTrainingArguments.train_files is empty: give the training records, e.g. "
                             "../shared/data/counterfact/counterfact-train.json.")
        for name, value, choices in (("outer_prompts", self.outer_prompts, OUTER_PROMPTS),
                                     ("zsre_target", self.zsre_target, ZSRE_TARGETS),
                                     ("model_dtype", self.model_dtype, ("float32", "bfloat16", "float16"))):
            if value not in choices:
                raise ValueError(f"MendTrainingArguments.{name}={value!r}: choose one of {list(choices)}.")
        if self.push_to_hub:
            raise ValueError("MendTrainingArguments.push_to_hub would make Trainer upload its checkpoints, optimizer "
                             "state included; set push_editor_to_hub=true and editor_repo_id=<namespace/name> to "
                             "push the trained editor alone.")
        if self.push_editor_to_hub and not self.editor_repo_id:
            raise ValueError("MendTrainingArguments.push_editor_to_hub needs editor_repo_id (e.g. "
                             "me/smollm2-mend-editor).")
        if self.early_stopping_patience is not None and not self.load_best_model_at_end:
            raise ValueError("MendTrainingArguments.early_stopping_patience needs load_best_model_at_end=true (and "
                             "eval_strategy / save_strategy 'steps' with the same interval).")
        self.remove_unused_columns = False  # the collator reads the text columns itself
        super().__post_init__()


# -- data ------------------------------------------------------------------------------------------------------


def load_training_records(files: Sequence[str], zsre_target: str = "alt") -> tuple[Any, list[dict[str, Any]]]:
    """One `datasets.Dataset` of `{prompt, target, rephrase, locality_prompt, locality_answer}` rows from flat
    CounterFact and MEND-format ZsRE files (or Hub datasets), and a description of each source (public name,
    format, records); records without a target are dropped."""
    import datasets

    parts, described = [], []
    for source in files:
        path = Path(source).expanduser()
        raw = (datasets.load_dataset("json", data_files=str(path), split="train") if path.exists()
               else datasets.load_dataset(source, split="train"))
        columns = set(raw.column_names)
        if {"src", "rephrase", "loc", "loc_ans", "alt", "answers"} <= columns:
            kind = "zsre"
        elif {"prompt", "target_new", "rephrase_prompt", "locality_prompt", "locality_ground_truth"} <= columns:
            kind = "counterfact"
        else:
            raise ValueError(f"MendTrainingArguments.train_files: {source!r} has columns {sorted(columns)}; expected "
                             "flat CounterFact (prompt, target_new, rephrase_prompt, locality_prompt, "
                             "locality_ground_truth) or MEND-format ZsRE (src, alt, answers, rephrase, loc, loc_ans).")
        examples = raw.map(_training_example, fn_kwargs={"kind": kind, "zsre_target": zsre_target},
                           remove_columns=raw.column_names).filter(_has_target)
        parts.append(examples)
        described.append({"name": public_path(source), "format": kind, "records": len(examples)})
    return datasets.concatenate_datasets(parts), described


def _has_target(row: Mapping[str, str]) -> bool:
    return bool(row["target"].strip())


def group_into_edits(records: Any, edits_per_batch: int, seed: int) -> Any:
    """The records shuffled with `seed` and grouped into batch edits: one row per group of `edits_per_batch`, each
    column a list, plus `batch_id` (the group's index). The groups stay fixed across epochs."""
    return records.shuffle(seed=seed).map(
        _group, batched=True, batch_size=edits_per_batch, with_indices=True, remove_columns=records.column_names,
        fn_kwargs={"edits_per_batch": edits_per_batch})


def _group(rows: Mapping[str, list[str]], indices: list[int], edits_per_batch: int) -> dict[str, list[Any]]:
    return {**{name: [values] for name, values in rows.items()}, "batch_id": [indices[0] // edits_per_batch]}


def _training_example(record: Mapping[str, Any], kind: str, zsre_target: str) -> dict[str, str]:
    if kind == "zsre":
        target = record["alt"] if zsre_target == "alt" else (record["answers"] or [""])[0]
        return {"prompt": record["src"], "target": target or "", "rephrase": record["rephrase"],
                "locality_prompt": record["loc"], "locality_answer": record["loc_ans"]}
    return {"prompt": record["prompt"], "target": record["target_new"], "rephrase": record["rephrase_prompt"],
            "locality_prompt": record["locality_prompt"], "locality_answer": record["locality_ground_truth"]}


@dataclass
class MendCollator:
    """Rows of `group_into_edits` → `{"episodes": [...]}`, per episode the token batches of its edit, outer and
    locality inputs (`edit_input_ids`, ..., `locality_labels`) and its `batch_id`."""

    tokenizer: Any
    outer_prompts: str = "rephrase"

    def __call__(self, groups: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, torch.Tensor]]]:
        return {"episodes": [self.encode(group) for group in groups]}

    def encode(self, group: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        prompts, targets, rephrases = group["prompt"], group["target"], group["rephrase"]
        outer_prompts = {"rephrase": rephrases, "prompt": prompts, "both": rephrases + prompts}[self.outer_prompts]
        outer_targets = targets * (len(outer_prompts) // len(targets))
        batches = {"edit": encode_continuations(self.tokenizer, prompts, targets),
                   "outer": encode_continuations(self.tokenizer, outer_prompts, outer_targets),
                   "locality": encode_continuations(self.tokenizer, group["locality_prompt"],
                                                    group["locality_answer"])}
        encoded = {f"{part}_{name}": getattr(batch, name) for part, batch in batches.items()
                   for name in ("input_ids", "attention_mask", "labels")}
        return {**encoded, "batch_id": torch.tensor(group["batch_id"])}


def _batch(episode: Mapping[str, torch.Tensor], part: str) -> EncodedBatch:
    return EncodedBatch(episode[f"{part}_input_ids"], episode[f"{part}_attention_mask"], episode[f"{part}_labels"])


# -- the trainer -------------------------------------------------------------------------------------------------


class MendTrainer(Trainer):
    """`transformers.Trainer` for a `MendEditor` on a frozen base model (see the module docstring).

    Besides `loss` it logs `edit_loss`, `locality_loss`, `edit_accuracy`, the unedited model's `pre_edit_loss` /
    `pre_edit_accuracy` on the same outer inputs and `prompt_accuracy` on the edit inputs (training: means since the
    last log; evaluation: `eval_` + name). A batch whose loss is not finite
    contributes no gradient and is counted in `nonfinite_batches`. Checkpoints are editor folders (plus Trainer's
    resume state); `save_model` writes the editor's own files.
    """

    def __init__(self, editor: MendEditor, base_model: nn.Module, tokenizer: Any, args: MendTrainingArguments,
                 train_dataset: Any, eval_dataset: Any = None, callbacks: list[Any] | None = None) -> None:
        callbacks = list(callbacks or [])
        if args.early_stopping_patience is not None:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=args.early_stopping_patience))
        super().__init__(model=editor, args=args, data_collator=MendCollator(tokenizer, args.outer_prompts),
                         train_dataset=train_dataset, eval_dataset=eval_dataset, callbacks=callbacks)
        self.base_model = base_model.requires_grad_(False).eval().to(args.device)
        self.spec = resolve_model_spec(self.base_model)
        # The first edited block when re-running the blocks from there reproduces the model (checked on the first
        # batch), -1 when it does not (whole-model forwards), None until checked.
        self.from_block: int | None = None
        self._episodes: dict[tuple[bool, int], EditEpisode] = {}  # (training, batch_id) -> kept lower-block pass
        self.nonfinite_batches = 0
        self._logged: dict[str, list[float]] = {}  # training metrics since the last log
        self._evaluated: dict[str, list[float]] = {}  # evaluation metrics of the running evaluation

    def episode(self, episode: Mapping[str, torch.Tensor], editor: MendEditor) -> EditEpisode:
        """The `EditEpisode` of one collated episode (kept across epochs with `cache_lower_blocks`)."""
        args: MendTrainingArguments = self.args
        key = (self.model.training, int(episode["batch_id"]))
        if key in self._episodes:
            return self._episodes[key]
        edit, outer, locality = (_batch(episode, part) for part in _BATCH_PARTS)
        if self.from_block is None:
            start = min(param.layer for param in editor.inner_params)
            self.from_block = start if blocks_match_full_model(self.base_model, self.spec, edit, start) else -1
        built = EditEpisode.build(self.base_model, self.spec, edit, outer, locality,
                                  self.from_block if self.from_block >= 0 else None)
        if args.cache_lower_blocks:
            self._episodes[key] = built
        return built

    def losses(self, editor: MendEditor, inputs: Mapping[str, Any]) -> list[MendLosses]:
        """MEND's objective on each episode of one collated batch (`MendCollator`)."""
        args: MendTrainingArguments = self.args
        return [mend_losses(editor, self.episode(episode, editor), edit_weight=args.edit_loss_weight,
                            locality_weight=args.locality_loss_weight) for episode in inputs["episodes"]]

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        episodes = self.losses(model, inputs)
        loss = sum(losses.total for losses in episodes) / len(episodes)
        if not torch.isfinite(loss):
            self.nonfinite_batches += 1
            logger.warning("MEND training: a batch gave a non-finite loss (%s); it contributes no gradient (%d so far)",
                           float(loss), self.nonfinite_batches)
            loss = sum(p.sum() for p in model.parameters()) * 0.0
        else:
            for losses in episodes:
                for name, value in losses.metrics().items():
                    self._logged.setdefault(name, []).append(value)
        return (loss, [losses.metrics() for losses in episodes]) if return_outputs else loss

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[torch.Tensor, None, None]:
        inputs = self._prepare_inputs(inputs)
        episodes = self.losses(model, inputs)  # the gradient factors need autograd inside
        for losses in episodes:
            for name, value in losses.metrics().items():
                self._evaluated.setdefault(name, []).append(value)
        return (sum(losses.total for losses in episodes) / len(episodes)).detach(), None, None

    def evaluation_loop(self, dataloader: Any, description: str, prediction_loss_only: bool | None = None,
                        ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval") -> EvalLoopOutput:
        self._evaluated = {}
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        output.metrics.update({f"{metric_key_prefix}_{name}": sum(values) / len(values)
                               for name, values in self._evaluated.items()})
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._logged:
            logs.update({name: sum(values) / len(values) for name, values in self._logged.items()})
            logs["nonfinite_batches"] = self.nonfinite_batches
            self._logged = {}
        super().log(logs, start_time)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Adam(W) over two groups: the editor networks at `learning_rate` (with `weight_decay`) and the step sizes
        at `step_size_learning_rate` (the reference's two optimizers, §8.5; Adam is per parameter)."""
        if self.optimizer is None:
            args: MendTrainingArguments = self.args
            editor: MendEditor = model if model is not None else self.model
            networks = [p for name, p in editor.named_parameters() if name != "step_sizes"]
            self.optimizer = torch.optim.AdamW(
                [{"params": networks, "lr": args.learning_rate, "weight_decay": args.weight_decay},
                 {"params": [editor.step_sizes], "lr": args.step_size_learning_rate, "weight_decay": 0.0}],
                betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
        return self.optimizer

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the editor folder (`model.safetensors`, `mend_editor.json`, card) into `output_dir`."""
        self.model.save_pretrained(output_dir or self.args.output_dir)


# -- the whole job ---------------------------------------------------------------------------------------------


@dataclass
class MendTrainingResult:
    """What `train_mend` produced."""

    editor: MendEditor
    editor_dir: Path
    metrics: dict[str, float]
    steps: int
    seconds: float
    pushed_revision: str | None = None


def train_mend(args: MendTrainingArguments) -> MendTrainingResult:
    """Load the base model and the training records, train an editor with `MendTrainer`, evaluate it on the
    validation split, save it to `editor_dir` (and push it with `push_editor_to_hub`)."""
    from transformers import set_seed

    set_seed(args.seed)
    start = time.perf_counter()
    model, tokenizer, source = load_model_and_tokenizer(args.model_name_or_path, revision=args.model_revision,
                                                        dtype=getattr(torch, args.model_dtype))
    spec = resolve_model_spec(model)
    records, described = load_training_records(args.train_files, args.zsre_target)
    if args.validation_size >= len(records):
        raise ValueError(f"MendTrainingArguments.validation_size={args.validation_size}: the training files hold only "
                         f"{len(records)} records.")
    split = records.train_test_split(test_size=args.validation_size, seed=args.seed)
    train, validation = split["train"], split["test"]
    if args.max_train_records is not None:
        train = train.select(range(min(args.max_train_records, len(train))))
    train_edits = group_into_edits(train, args.edits_per_batch, args.seed)
    validation_edits = group_into_edits(validation, args.edits_per_batch, args.seed)
    logger.info("MEND training: %d training and %d validation records from %s", len(train), len(validation),
                ", ".join(item["name"] for item in described))
    editor = MendEditor.for_model(
        model, spec, inner_modules=args.inner_modules or default_inner_modules(model, spec, args.inner_blocks),
        base_model=source.name_or_path if source.origin != "local" else None,
        base_model_revision=source.commit_sha or source.revision, base_model_origin=source.origin,
        rank=args.editor_rank, n_hidden=args.editor_n_hidden, normalize=args.editor_normalize,
        initial_step_size=args.initial_step_size)
    trainer = MendTrainer(editor, model, tokenizer, args, train_edits, validation_edits)
    resume = args.resume_from_checkpoint
    output = trainer.train(resume_from_checkpoint=True if str(resume).lower() == "true" else resume)
    metrics = trainer.evaluate()
    seconds = time.perf_counter() - start
    editor.config.training = {
        "data": described, "train_records": len(train), "validation_records": len(validation), "seed": args.seed,
        "arguments": {name: getattr(args, name) for name in _RECORDED_ARGUMENTS},
        "steps": output.global_step, "epochs": trainer.state.epoch or 0.0, "seconds": seconds,
        "hardware": _hardware(args.device), "nonfinite_batches": trainer.nonfinite_batches,
        "metrics": {name.replace("eval_", "validation_", 1): float(value) for name, value in metrics.items()
                    if name.startswith("eval_") and name not in ("eval_runtime", "eval_samples_per_second",
                                                                 "eval_steps_per_second", "eval_epoch")}}
    editor_dir = Path(args.editor_dir or Path(args.output_dir) / EDITOR_DIR)
    editor.save_pretrained(editor_dir)
    pushed = None
    if args.push_editor_to_hub:
        pushed = editor.push_to_hub(args.editor_repo_id, private=args.hub_private_repo, token=args.hub_token)
    return MendTrainingResult(editor, editor_dir, editor.config.training["metrics"], output.global_step, seconds,
                              pushed)


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


__all__ = ["MendCollator", "MendTrainer", "MendTrainingArguments", "MendTrainingResult", "group_into_edits",
           "load_training_records", "train_mend"]
