"""What the suites share: eval.files resolution, the suites' default settings, and greedy batched answers."""

from __future__ import annotations

import glob
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from medgpt.errors import ConfigError

CONF_EVAL = Path(__file__).resolve().parents[2] / "conf" / "eval"


def resolve_files(patterns, root: Path, key: str) -> list[Path]:
    """Paths or globs relative to paths.root (absolute ones as they are), in order; one sentence for a missing one."""
    if not patterns:
        raise ConfigError(f"{key} is empty: name at least one file (paths relative to the project root).")
    files: list[Path] = []
    for pattern in patterns:
        p = Path(str(pattern)).expanduser()
        p = p if p.is_absolute() else root / p
        matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True)) if glob.has_magic(str(p)) else [p]
        if not matches or not all(m.is_file() for m in matches):
            raise ConfigError(f"{key}: {pattern} does not exist (looked for {p}); check the path (relative to {root}).")
        files += matches
    return files


def rel(path: Path, root: Path) -> str:
    """`path` relative to the project root when it lies inside it (settings and ids stay the same on every machine)."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def default_node(suite: str) -> DictConfig:
    """conf/eval/<suite>.yaml over the schema: the settings `eval=<suite>` gives with no other eval.* override."""
    from medgpt.config import EvalConfig

    raw = OmegaConf.load(CONF_EVAL / f"{suite}.yaml")
    if "defaults" in raw:
        del raw["defaults"]
    return OmegaConf.merge(OmegaConf.structured(EvalConfig), raw)


def greedy_answers(loaded, prompts: list[list[int]], max_new_tokens: int) -> list:
    """Greedy completions (medgpt.serving.engine.Completion: text, finish_reason, completion_tokens) of `prompts`.

    All are submitted at once to the run's hf engine, which decodes them as one batch (the engine was started
    with max_batch_size = eval.batch_size and a long batch wait, so the batches are the same on every run).
    A prompt longer than the context keeps its end.
    """
    from medgpt.serving.engine import SamplingParams

    handles = []
    for ids in prompts:
        keep = max(1, loaded.context_length - max_new_tokens)
        ids = ids[-keep:]
        room = max(1, min(max_new_tokens, loaded.context_length - len(ids)))
        params = SamplingParams(max_tokens=room, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=0)
        handles.append(loaded.engine.submit(ids, params))
    return [h.result() for h in handles]
