"""mode=webui: a Gradio chat over the same engine as the API (concurrent users are batched together).

Streaming answers, a system-prompt box, temperature / top_p / max_tokens sliders, clear (the bin
icon of the chat), and upload of a .txt or .md document whose text is put before the question as
context. A document above `serve.max_upload_kb` is refused with a message saying so; the document
stays in the conversation (later turns see it too, read again from Gradio's upload cache).
"""

from __future__ import annotations

import os
from pathlib import Path

from medgpt.serving.engine import sampling_params

DOC_TYPES = (".txt", ".md")


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
    description = (f"**{a.name}** — weights: {a.weights}, template: {a.template.name}"
                   f"{', adapter: ' + Path(a.adapter_path).name if a.adapter_path else ''}. "
                   f"Attach a .txt or .md document (up to {max_upload_kb} KB) to ask about it. Not medical advice.")
    inputs = [
        gr.Textbox(label="System prompt", value=a.template.default_system or "", lines=2),
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
