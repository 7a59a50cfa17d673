"""mode=webui: a Gradio chat over the same engine as the API (concurrent users are batched together).

Streaming answers, a system-prompt box, temperature / top_p / max_tokens sliders, clear (the bin
icon of the chat), and upload of a .txt or .md document whose text is put before the question as
context. A document above `serve.max_upload_kb` is refused with a message saying so; the document
stays in the conversation (later turns see it too, read again from Gradio's upload cache).

The header names the base model, the adapter (or the run's full weights) and the chat template once. The
system prompt box starts with the prompt the run trained with (its config.yaml's `data.system_prompt`),
else with MEDICAL_SYSTEM_PROMPT; never with the base model's own ("You are ... SmolLM ...").
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from medgpt.serving.engine import sampling_params

log = logging.getLogger(__name__)
DOC_TYPES = (".txt", ".md")
MEDICAL_SYSTEM_PROMPT = ("You are a careful medical assistant. Answer health questions accurately and clearly, say when you "
                         "are not sure, and advise seeing a doctor for a diagnosis, for treatment, or at once in an emergency.")


def _run_config(artefacts):
    """The served run's config.yaml (None without a run, or when it cannot be read)."""
    if artefacts.run_dir is None or not (Path(artefacts.run_dir) / "config.yaml").exists():
        return None
    from omegaconf import OmegaConf

    try:
        return OmegaConf.load(Path(artefacts.run_dir) / "config.yaml")
    except Exception as e:  # a damaged config must not stop the UI: fall back to the defaults
        log.warning("cannot read %s/config.yaml: %s", artefacts.run_dir, e)
        return None


def default_system_prompt(artefacts) -> str:
    """The run's training system prompt (data.system_prompt), else MEDICAL_SYSTEM_PROMPT."""
    from omegaconf import OmegaConf

    cfg = _run_config(artefacts)
    prompt = OmegaConf.select(cfg, "data.system_prompt", default=None) if cfg is not None else None
    return prompt.strip() if isinstance(prompt, str) and prompt.strip() else MEDICAL_SYSTEM_PROMPT


def model_name(path: str | None) -> str:
    """A readable name for a model folder or hub id: 'org/name' for a Hugging Face cache snapshot, else the folder name."""
    if not path:
        return "?"
    p = Path(path)
    if not p.is_absolute() and not p.exists():
        return str(path)  # a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct
    parts = p.parts
    if "snapshots" in parts:  # .../models--org--name/snapshots/<commit>
        i = parts.index("snapshots")
        if i > 0 and parts[i - 1].startswith("models--"):
            return parts[i - 1][len("models--"):].replace("--", "/")
    return p.name or str(path)


def _relative(path: str, run_dir) -> str:
    try:
        return str(Path(path).relative_to(Path(run_dir).parent))
    except (TypeError, ValueError):
        return Path(path).name


def header(artefacts) -> str:
    """'**<name>**: base model X + adapter <run>/adapter, chat template T' (each named once)."""
    a = artefacts
    if a.weights == "adapter":
        what = f"base model {model_name(a.model_path)} + adapter {_relative(a.adapter_path, a.run_dir)}"
    elif a.weights == "untrained":
        what = f"base model {model_name(a.model_path)} (untrained)"
    else:  # merged | model: the run's full weights
        from omegaconf import OmegaConf

        cfg = _run_config(a)
        base = OmegaConf.select(cfg, "model.name_or_path", default=None) if cfg is not None else None
        kind = "merged model" if a.weights == "merged" else "fine-tuned model"
        what = f"{kind} {_relative(a.model_path, a.run_dir)}" + (f" (base model {model_name(base)})" if base else "")
    return f"**{a.name}**: {what}, chat template {a.template.name}"


class DocumentError(ValueError):
    """An upload we refuse; its message is shown in the chat."""


def read_document(path: str | os.PathLike, max_kb: int) -> tuple[str, str]:
    """(file name, text) of an uploaded document, or DocumentError with a message for the user."""
    p = Path(path)
    if p.suffix.lower() not in DOC_TYPES:
        raise DocumentError(f"{p.name}: only .txt and .md documents can be added as context.")
    size = p.stat().st_size
    if size > max_kb * 1024:
        raise DocumentError(f"{p.name} is {size / 1024:.0f} KB, above the {max_kb} KB limit for documents "
                            "(serve.max_upload_kb); upload a shorter extract.")
    try:
        return p.name, p.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise DocumentError(f"{p.name} is not UTF-8 text; save it as UTF-8 and upload it again.") from None


def with_documents(question: str, docs: list[tuple[str, str]]) -> str:
    if not docs:
        return question
    context = "\n\n".join(f"Document {name}:\n{text}" for name, text in docs)
    return f"{context}\n\n{question or 'Summarise the document above.'}"


def _parts(content) -> tuple[list[str], list[str]]:
    """(texts, file paths) of one Gradio chat message's content, whatever shape Gradio gives it."""
    texts, files = [], []
    items = content if isinstance(content, (list, tuple)) else [content]
    for item in items:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict):
            if isinstance(item.get("text"), str):
                texts.append(item["text"])
            ref = item["file"] if isinstance(item.get("file"), dict) else item
            if isinstance(ref.get("path"), str):
                files.append(ref["path"])
        elif getattr(item, "value", None) is not None:  # a Gradio component (e.g. gr.File) in the history
            value = item.value
            path = value.get("path") if isinstance(value, dict) else getattr(value, "path", None)
            if path:
                files.append(path)
    return texts, files


def to_messages(history: list, max_kb: int) -> list[dict]:
    """Gradio's chat history -> user/assistant messages, uploaded documents folded into their user turn."""
    out: list[dict] = []
    docs: list[tuple[str, str]] = []
    for msg in history:
        role = msg.get("role") if isinstance(msg, dict) else getattr(msg, "role", None)
        content = msg.get("content") if isinstance(msg, dict) else getattr(msg, "content", None)
        texts, files = _parts(content)
        if role == "user":
            for f in files:
                try:
                    docs.append(read_document(f, max_kb))
                except (DocumentError, OSError):
                    pass  # it was refused (or is gone) when it was uploaded
            text = "\n".join(t for t in texts if t)
            if not text:
                continue  # a file-only entry: its text joins the next question
            content_text = with_documents(text, docs)
            docs = []
            if out and out[-1]["role"] == "user":
                out[-1]["content"] += "\n" + content_text
            else:
                out.append({"role": "user", "content": content_text})
        elif role == "assistant" and out:
            text = "\n".join(t for t in texts if t)
            if out[-1]["role"] == "assistant":
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "assistant", "content": text})
    return out


def build_ui(loaded, generation, max_upload_kb: int = 200, max_tokens_limit: int = 1024):
    import gradio as gr

    def respond(message, history, system, temperature, top_p, max_tokens):
        text = message.get("text", "") if isinstance(message, dict) else str(message or "")
        try:
            docs = [read_document(f if isinstance(f, str) else f.get("path"), max_upload_kb)
                    for f in (message.get("files", []) if isinstance(message, dict) else [])]
        except DocumentError as e:
            yield str(e)
            return
        if not text.strip() and not docs:
            yield "Type a question (and optionally attach a .txt or .md document)."
            return
        messages = ([{"role": "system", "content": system.strip()}] if system and system.strip() else [])
        messages += to_messages(history, max_upload_kb) + [{"role": "user", "content": with_documents(text, docs)}]
        ids = loaded.chat_ids(messages)
        room = loaded.context_length - len(ids)
        if room <= 0:
            yield (f"The conversation is {len(ids)} tokens, more than the model's context of {loaded.context_length}: "
                   "clear the chat or use a shorter document.")
            return
        params = sampling_params(generation, temperature=temperature, top_p=top_p, max_tokens=min(int(max_tokens), room))
        answer = ""
        for delta in loaded.engine.stream(ids, params):  # closing this generator (Stop) cancels the request
            if delta.finish_reason == "error":
                yield answer + f"\n\n(generation failed: {delta.error})"
                return
            answer += delta.text
            yield answer
        if not answer:
            yield "(the model ended its answer without any text)"

    a = loaded.artefacts
    description = (f"{header(a)}. Attach a .txt or .md document (up to {max_upload_kb} KB) to ask about it. "
                   "Not medical advice.")
    inputs = [
        gr.Textbox(label="System prompt", value=default_system_prompt(a), lines=2),
        gr.Slider(0.0, 2.0, value=float(generation.temperature), step=0.05, label="temperature (0 = greedy)"),
        gr.Slider(0.05, 1.0, value=float(generation.top_p), step=0.05, label="top_p"),
        gr.Slider(1, max_tokens_limit, value=min(int(generation.max_new_tokens), max_tokens_limit), step=1, label="max_tokens"),
    ]
    return gr.ChatInterface(
        respond, multimodal=True, title="medgpt", description=description, additional_inputs=inputs,
        additional_inputs_accordion=gr.Accordion("Settings", open=True),
        textbox=gr.MultimodalTextbox(file_types=list(DOC_TYPES), file_count="multiple", placeholder="Ask a question..."),
        chatbot=gr.Chatbot(label=a.name, height=480), api_name="chat", analytics_enabled=False, fill_height=True,
    )
