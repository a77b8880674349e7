"""Evaluation of edited models: batched scorer, CounterFact / ZsRE / fluency runner, general-capability suite.

```python
from hf_alphaedit.evaluation import evaluate_edits, evaluate_general
report = evaluate_edits(model, tokenizer, "../shared/data/counterfact/counterfact-edit.json", limit=1000)
general = evaluate_general(model, tokenizer, "../shared/data/general", num_examples=100)
```
"""

from .editing import evaluate_edits, load_edit_records
from .general import GENERAL_TASKS, evaluate_general
from .scorer import (
    ContinuationScore,
    encode_prompt,
    encode_target,
    generate_texts,
    greedy_answers,
    score_continuations,
)

__all__ = [
    "GENERAL_TASKS",
    "ContinuationScore",
    "encode_prompt",
    "encode_target",
    "evaluate_edits",
    "evaluate_general",
    "generate_texts",
    "greedy_answers",
    "load_edit_records",
    "score_continuations",
]
