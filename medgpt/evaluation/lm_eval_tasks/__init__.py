"""A cross-check of eval=mcq with lm-evaluation-harness (pip install 'medgpt[lm-eval]').

medgpt_mcq.yaml is an lm-eval task that scores prompts medgpt rendered itself: export_prompts() writes, for every
question of eval.files, the chat-templated prompt eval=mcq scores (medgpt.evaluation.mcq.messages rendered with the
model's template), the continuations (letters, or option texts with eval.target=text) and the gold index. lm-eval then
computes its own log-likelihoods on the same model, so its `acc` must equal medgpt's accuracy_sum and its `acc_bytes`
(and `acc_norm` for ASCII text) medgpt's accuracy with eval.normalize=byte (tests/test_eval_lm_eval.py).

One difference to know: lm-eval moves a prompt's trailing whitespace into the continuation, so with a prompt that
ends in a newline (every chat template's "assistant\\n") its per-choice log-likelihoods include that newline's
log-probability — the same for every choice, so `acc` is unchanged, but the length-normalised scores are not. The
cross-check therefore uses a prompt that ends without whitespace (the test sets template.assistant_start).
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

TASK_DIR = Path(__file__).resolve().parent
TASK = "medgpt_mcq"


def export_prompts(cfg: DictConfig, path: Path) -> Path:
    """The prompts eval=mcq scores for cfg (eval.files, eval.target, eval.shots, the model's template) as a JSONL."""
    from medgpt.evaluation import mcq
    from medgpt.modeling.loader import load_tokenizer
    from medgpt.serving.loading import Loaded, resolve_artefacts

    e, root = cfg.eval, Path(cfg.paths.root)
    data = mcq.prepare(e, root)
    artefacts = resolve_artefacts(cfg)
    tokenizer = load_tokenizer(artefacts.tokenizer_path, artefacts.trust_remote_code)
    loaded = Loaded(artefacts, None, tokenizer, artefacts.template, [], 0)  # rendering only: no weights, no engine
    with open(path, "w", encoding="utf-8") as fh:
        for item in data.items:
            letters = [k for k, v in item.options.items() if e.target == "letter" or v]
            fh.write(json.dumps({"id": item.id, "prompt": loaded.render(mcq.messages(item, data.shots, e.target)),
                                 "choices": [mcq.continuation(item, k, e.target) for k in letters],
                                 "letters": letters, "gold": letters.index(item.answer)}, ensure_ascii=False) + "\n")
    return Path(path)
