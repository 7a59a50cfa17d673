"""Chat templates as data: render a conversation message by message, and the equivalent Jinja.

A template (conf/template/*.yaml) is a handful of formats with a `{content}` slot; `{bos}` and
`{eos}` stand for the tokenizer's special tokens. A conversation renders as

    prefix  [system]  ( user  assistant_start  ASSISTANT  assistant_end )*

where only ASSISTANT (the `assistant` format: answer plus stop string) is trained. Rendering yields
segments tagged with their role in the mask, so the label mask is exact by construction — no
rendering of prefixes and diffing of strings. `to_jinja()` writes the same template as a Hugging
Face chat template (with `{% generation %}` marks), saved with the tokenizer so that serving and
vLLM format prompts exactly as training did; a test checks the two render identical text.

`system_position`: `turn` (its own turn), `first_user` (inside the first user turn: Llama 2, Gemma) or
`last_user` (inside the last one: Mistral). Tool calls (medgpt.data.tool_render, `tool_style`): the tool
list joins the system prompt (mistral: before the last user turn), an assistant's calls are part of its
trained answer, and a tool result is a prompt turn — the `tool` format when the family has a role for it
(llama3 ipython, glm4 observation, mistral [TOOL_RESULTS]), else the `user` format (consecutive results
share one turn). A tool result starts a new turn for truncation, like a user message.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from medgpt.data import tool_render
from medgpt.errors import ConfigError, DataError

ROLES = ("system", "user", "assistant", "tool")
SYSTEM_POSITIONS = ("turn", "first_user", "last_user")
TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "conf" / "template"

# Probe conversations used to recognise a tokenizer's own chat template (template=auto).
_PROBES = [
    [{"role": "user", "content": "What is a fever?"}, {"role": "assistant", "content": "A raised body temperature."}],
    [
        {"role": "system", "content": "You are careful."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Is 38 C a fever?"},
        {"role": "assistant", "content": "Yes, in adults."},
    ],
]


@dataclass(frozen=True)
class Segment:
    text: str
    kind: str  # prompt | answer | answer_end | turn_end  (answer and answer_end are trained)


@dataclass(frozen=True)
class Template:
    name: str
    prefix: str = ""
    system: str = "{content}"
    user: str = "{content}"
    assistant_start: str = ""
    assistant: str = "{content}"
    assistant_end: str = ""
    stop: str = ""
    default_system: str | None = None
    system_position: str = "turn"
    tool_style: str = "plain"  # medgpt.data.tool_render.STYLES
    tool: str = ""  # a tool result's turn, with {content}; empty: the `user` format

    @classmethod
    def from_mapping(cls, data: Mapping) -> Template:
        known = {f.name for f in fields(cls)}
        t = cls(**{k: v for k, v in dict(data).items() if k in known})
        for f in ("system", "user", "assistant"):
            if getattr(t, f).count("{content}") != 1:
                raise ConfigError(f"template {t.name}: field '{f}' must contain {{content}} exactly once.")
        if t.tool and t.tool.count("{content}") != 1:
            raise ConfigError(f"template {t.name}: field 'tool' must contain {{content}} exactly once (or be empty).")
        if not t.stop:
            raise ConfigError(f"template {t.name}: 'stop' (the end-of-turn string) must not be empty.")
        if t.system_position not in SYSTEM_POSITIONS or t.tool_style not in tool_render.STYLES:
            raise ConfigError(f"template {t.name}: system_position must be one of {', '.join(SYSTEM_POSITIONS)} and tool_style "
                              f"one of {', '.join(tool_render.STYLES)} (got {t.system_position!r}, {t.tool_style!r}).")
        return t

    def special(self, text: str, bos: str, eos: str) -> str:
        return text.replace("{bos}", bos or "").replace("{eos}", eos or "")

    def stop_string(self, bos: str, eos: str) -> str:
        return self.special(self.stop, bos, eos)

    def segments(self, messages: list[dict], bos: str = "", eos: str = "", add_generation_prompt: bool = False,
                 tools: list[dict] | None = None) -> list[list[Segment]]:
        """Render `messages` as turns of segments; turn 0 is the head (prefix and system)."""
        fmt = lambda f, content: self.special(f, bos, eos).replace("{content}", content)  # noqa: E731
        style = self.tool_style
        if tools:
            tool_render.refuse_without_format(style, self.name)
        system, rest = _split_system(messages, self.default_system)
        system = tool_render.with_tools(style, system, tools)
        head = [Segment(fmt(self.prefix, ""), "prompt")] if self.prefix else []
        if system is not None and self.system_position == "turn":
            head.append(Segment(fmt(self.system, system), "prompt"))
        users = [i for i, m in enumerate(rest) if m["role"] == "user"]
        system_at = {"first_user": users[:1], "last_user": users[-1:]}.get(self.system_position, []) if system is not None else []
        turns: list[list[Segment]] = [head]
        for i, msg in enumerate(rest):
            role, content = msg["role"], msg["content"]
            if role == "user":
                if i in system_at:
                    content = fmt(self.system, system) + content
                before = tool_render.before_last_user(style, tools) if users and i == users[-1] else ""
                turns.append([Segment(before + fmt(self.user, content), "prompt")])
            elif role == "assistant":
                if i == 0:  # a conversation that opens with the assistant: keep it out of the head
                    turns.append([])
                content = tool_render.answer_text(style, self.name, content, msg.get("tool_calls") or [])
                lead, tail = self.special(self.assistant, bos, eos).split("{content}")
                turns[-1] += [Segment(self.special(self.assistant_start, bos, eos), "prompt"),
                              Segment(lead + content, "answer"), Segment(tail, "answer_end"),
                              Segment(self.special(self.assistant_end, bos, eos), "turn_end")]
            elif role == "tool":
                result = tool_render.result_text(style, content)
                if self.tool:
                    turns.append([Segment(fmt(self.tool, result), "prompt")])
                elif i and rest[i - 1]["role"] == "tool":  # consecutive results share one user turn
                    continue
                else:
                    group = [result]
                    for later in rest[i + 1:]:
                        if later["role"] != "tool":
                            break
                        group.append(tool_render.result_text(style, later["content"]))
                    turns.append([Segment(fmt(self.user, "\n".join(group)), "prompt")])
            else:
                raise DataError(f"message {i}: role '{role}' is not allowed after the first message (use {', '.join(ROLES)}).")
        if add_generation_prompt:
            turns[-1].append(Segment(self.special(self.assistant_start, bos, eos), "prompt"))
        return [[s for s in turn if s.text] for turn in turns]

    def render(self, messages: list[dict], bos: str = "", eos: str = "", add_generation_prompt: bool = False,
               tools: list[dict] | None = None) -> str:
        return "".join(s.text for turn in self.segments(messages, bos, eos, add_generation_prompt, tools) for s in turn)

    def to_jinja(self) -> str:
        """The same template as a Hugging Face chat template (bos_token/eos_token from the tokenizer).

        It renders plain dialogues (system, user, assistant) exactly as `render` does. Tools are medgpt's
        alone: the Jinja raises on a `tools` list, a `tool` message or an assistant's `tool_calls` (mode=serve
        renders those with `render(..., tools=...)`), rather than render them differently from training."""
        lit = lambda f: _jinja_concat(f, None)  # noqa: E731
        system_default = "none" if self.default_system is None else _jinja_str(self.default_system)
        parts = [
            "{%- if tools -%}{{ raise_exception('This template renders tools through medgpt only (mode=serve)') }}{%- endif -%}",
            "{%- if messages and messages[0]['role'] == 'system' -%}",
            "{%- set system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}",
            f"{{%- else -%}}{{%- set system = {system_default} -%}}{{%- set loop_messages = messages -%}}{{%- endif -%}}",
        ]
        if self.prefix:
            parts.append("{{ " + lit(self.prefix) + " }}")
        if self.system_position == "turn":
            parts.append("{%- if system is not none -%}{{ " + _jinja_concat(self.system, "system") + " }}{%- endif -%}")
        parts.append("{%- set ns = namespace(first=-1, last=-1) -%}{%- for m in loop_messages -%}{%- if m['role'] == 'user' -%}"
                     "{%- if ns.first < 0 -%}{%- set ns.first = loop.index0 -%}{%- endif -%}{%- set ns.last = loop.index0 -%}"
                     "{%- endif -%}{%- endfor -%}")
        lead, tail = self.assistant.split("{content}")
        user_first = _jinja_concat(self.user, _jinja_concat(self.system, "system") + " + message['content']")
        user_plain = _jinja_concat(self.user, "message['content']")
        at = {"first_user": "ns.first", "last_user": "ns.last"}.get(self.system_position)
        user_block = ("{%- if loop.index0 == " + at + " and system is not none -%}{{ " + user_first + " }}{%- else -%}{{ "
                      + user_plain + " }}{%- endif -%}" if at else "{{ " + user_plain + " }}")
        parts += [
            "{%- for message in loop_messages -%}",
            "{%- if message['role'] == 'user' -%}" + user_block,
            "{%- elif message['role'] == 'assistant' and not message.tool_calls -%}",
            ("{{ " + lit(self.assistant_start) + " }}" if self.assistant_start else ""),
            "{%- generation -%}{{ " + _jinja_concat(lead + "{content}" + tail, "message['content']") + " }}{%- endgeneration -%}",
            ("{{ " + lit(self.assistant_end) + " }}" if self.assistant_end else ""),
            "{%- else -%}{{ raise_exception('Conversation roles must be user/assistant after an optional first system message "
            "(tool calls and results are rendered by medgpt only)') }}",
            "{%- endif -%}{%- endfor -%}",
            "{%- if add_generation_prompt -%}" + ("{{ " + lit(self.assistant_start) + " }}" if self.assistant_start else "") + "{%- endif -%}",
        ]
        return "".join(parts)


def _split_system(messages: list[dict], default_system: str | None) -> tuple[str | None, list[dict]]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return default_system, messages


def _jinja_str(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _jinja_concat(fmt: str, content_expr: str | None) -> str:
    """A Jinja expression for `fmt`, with {content} -> content_expr and {bos}/{eos} -> the special tokens."""
    pieces: list[str] = []
    rest = fmt
    while rest:
        idx = {tok: rest.find(tok) for tok in ("{content}", "{bos}", "{eos}") if tok in rest}
        if not idx:
            pieces.append(_jinja_str(rest))
            break
        tok, at = min(idx.items(), key=lambda kv: kv[1])
        if at:
            pieces.append(_jinja_str(rest[:at]))
        pieces.append({"{content}": f"({content_expr})", "{bos}": "bos_token", "{eos}": "eos_token"}[tok])
        rest = rest[at + len(tok):]
    return " + ".join(pieces) if pieces else "''"


def available_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.yaml") if p.stem != "auto")


def load_template(name: str) -> Template:
    path = TEMPLATE_DIR / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown template '{name}': use one of {', '.join(available_templates())}.")
    return Template.from_mapping(yaml.safe_load(path.read_text()))


def identify_template(tokenizer, candidates: Iterable[str] | None = None) -> Template:
    """The conf/template whose rendering equals the tokenizer's own chat template on probe dialogues."""
    own = getattr(tokenizer, "chat_template", None)
    if not own:
        raise ConfigError("template=auto, but the tokenizer has no chat template: pick one with template=<name> "
                          f"({', '.join(available_templates())}).")
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    for name in candidates or available_templates():
        template = load_template(name)
        try:
            cases = [(p, False) for p in _PROBES] + [(p[:-1], True) for p in _PROBES]
            if all(tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=g) == template.render(p, bos, eos, g)
                   for p, g in cases):
                return template
        except Exception:  # a foreign template may reject our probes; it is then simply no match
            continue
    raise ConfigError("template=auto: the tokenizer's chat template matches none of conf/template/*.yaml; pick the closest "
                      f"with template=<name> ({', '.join(available_templates())}) or add a YAML template.")


def resolve_template(template_cfg: Mapping, model_template: str, tokenizer) -> Template:
    """template=<name> wins; template=auto falls back to model.template, then to the tokenizer's own."""
    if template_cfg["name"] != "auto":
        return Template.from_mapping(template_cfg)
    if model_template and model_template != "auto":
        return load_template(model_template)
    return identify_template(tokenizer)


SAVED_TEMPLATE = "medgpt_template.yaml"  # written next to every saved tokenizer (adapter/, model/, merged/)


def load_saved_template(folder: Path) -> Template | None:
    """The template a run trained with, from the artefact folder it was saved in (None if absent)."""
    path = Path(folder) / SAVED_TEMPLATE
    return Template.from_mapping(yaml.safe_load(path.read_text())) if path.exists() else None


def stop_token_ids(tokenizer, template: Template | None) -> list[int]:
    """Token ids that end an answer: the template's stop string when it is one token, and the eos token."""
    ids = []
    if template is not None:
        encoded = tokenizer(template.stop_string(tokenizer.bos_token, tokenizer.eos_token), add_special_tokens=False)["input_ids"]
        if len(encoded) == 1:
            ids.append(encoded[0])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
