"""Evaluation of edited models: batched scorer and decoder, CounterFact / ZsRE / live-decoding / fluency runner with a
protocol card on every result, general-capability suite.

```python
from hf_alphaedit.evaluation import evaluate_edits, evaluate_general
report = evaluate_edits(model, tokenizer, "../shared/data/counterfact/counterfact-edit.json", limit=1000, live=True)
general = evaluate_general(model, tokenizer, "../shared/data/general", num_examples=100)
```
"""

from .decoding import (
    GREEDY,
    REFERENCE_SAMPLING,
    LiveDecoding,
    Sampling,
    decode,
    generate_texts,
    greedy_answers,
)
from .editing import evaluate_edits, load_edit_records, summarize_record_scores
from .general import GENERAL_TASKS, evaluate_general
from .protocol import editor_protocol
from .scorer import ContinuationScore, encode_prompt, encode_target, score_continuations

__all__ = [
    "GENERAL_TASKS",
    "GREEDY",
    "REFERENCE_SAMPLING",
    "ContinuationScore",
    "LiveDecoding",
    "Sampling",
    "decode",
    "editor_protocol",
    "encode_prompt",
    "encode_target",
    "evaluate_edits",
    "evaluate_general",
    "generate_texts",
    "greedy_answers",
    "load_edit_records",
    "score_continuations",
    "summarize_record_scores",
]
