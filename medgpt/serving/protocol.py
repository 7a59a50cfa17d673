"""OpenAI-compatible request schemas (pydantic) and the JSON error body every 4xx/5xx answer carries.

Unknown fields are ignored (clients send many), but every field we read is checked, with strict types
(`"stream": "yes"` or `"max_tokens": true` are refused, not coerced): a bad value is a 400 whose body
names the field, e.g. {"error": {"message": "messages: Input should be a valid list",
"type": "invalid_request_error", "param": "messages", "code": "invalid_value"}}.
"""

from __future__ import annotations

import re
from typing import Literal, Optional, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class RequestError(Exception):
    """A request we refuse; becomes a JSON error body with `param` naming the field."""

    def __init__(self, param: str | None, message: str, status: int = 400, kind: str = "invalid_request_error", code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.message, self.status, self.kind, self.code = param, message, status, kind, code


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error", code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1)
    arguments: str  # a JSON object, as a string (OpenAI)


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None]  # null (or left out) only for an assistant message with tool_calls
    tool_calls: Optional[list[ToolCall]] = None  # an assistant's earlier calls
    tool_call_id: Optional[str] = None  # a tool result: the call it answers
    name: Optional[str] = None

    @model_validator(mode="before")
    @classmethod
    def _content(cls, data):
        if isinstance(data, dict) and data.get("content") is None:
            data = {k: v for k, v in data.items() if k != "content"}  # otherwise: "content: this field is required"
            if data.get("role") == "assistant" and data.get("tool_calls"):
                data["content"] = None
        return data

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1)
    description: Optional[str] = None
    parameters: Optional[dict] = None


class ToolSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionSpec

    def schema(self) -> dict:
        """The OpenAI function schema as templates render it (fields the client left out are left out)."""
        return {"type": "function", "function": self.function.model_dump(exclude_none=True)}


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, strict=True)


class _Sampling(BaseModel):
    # strict=True: JSON true is not 1, "yes" is not true, 2.5 is not an int (floats still take ints: 0 is 0.0)
    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, gt=0, strict=True)
    temperature: Optional[float] = Field(None, ge=0, le=2, strict=True)
    top_p: Optional[float] = Field(None, gt=0, le=1, strict=True)
    top_k: Optional[int] = Field(None, ge=-1, strict=True)
    repetition_penalty: Optional[float] = Field(None, gt=0, le=10, strict=True)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1, strict=True)
    stream: bool = Field(False, strict=True)
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=1, strict=True, description="only one choice per request")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else v
        if stops is not None and (len(stops) > 4 or any(not s for s in stops)):
            raise ValueError("give at most 4 non-empty stop strings")
        return v


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, gt=0, strict=True)
    tools: Optional[list[ToolSpec]] = None
    tool_choice: Optional[Literal["auto", "none"]] = None  # a forced call ("required", a named function) is not supported

    def offered_tools(self) -> list[dict] | None:
        """The tool schemas the model may call (none with tool_choice "none")."""
        return [t.schema() for t in self.tools] if self.tools and self.tool_choice != "none" else None

    def wanted_tokens(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str]]
    echo: bool = Field(False, strict=True)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        prompts = [v] if isinstance(v, str) else v
        if not prompts or any(not p for p in prompts):
            raise ValueError("give a non-empty prompt (or a non-empty list of non-empty prompts)")
        return v

    @field_validator("echo")
    @classmethod
    def _echo(cls, v):
        if v:
            raise ValueError("echo is not supported")
        return v

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def wanted_tokens(self) -> Optional[int]:
        return self.max_tokens


_BRANCH = re.compile(r"^(str|int|float|bool|none|TextPart|[\w-]+\[.*\])$")


def first_validation_error(errors: list[dict]) -> tuple[str | None, str]:
    """(param, message) for the first pydantic error of a request body."""
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return None, "the request body is not valid JSON"
    # drop the union branch names pydantic inserts ('str', 'list[TextPart]', 'function-after[...]', 'TextPart'),
    # never a field name ('stream', 'stream_options')
    loc = [p for p in loc if not _BRANCH.match(p)]
    param = ".".join(loc) or None
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if err.get("type") == "missing":
        msg = "this field is required"
    return param, f"{param}: {msg}" if param else msg
