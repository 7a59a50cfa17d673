"""mode=chat: a terminal chat that streams answers and keeps the whole conversation.

Every turn sends the full history (system prompt, all earlier questions and answers, the new
question) rendered with the run's template — MedicalGPT's CLI dropped earlier turns. When the
history outgrows the model's context, the oldest turns are dropped with a notice.

Commands: /reset (forget the conversation), /system <text> (set the system prompt; resets),
/show (the exact prompt of the last turn), /help, /exit. Ctrl-C stops an answer mid-way (the part
already shown stays in the history); Ctrl-C or Ctrl-D at the prompt leaves.
"""

from __future__ import annotations

import sys

from medgpt.serving.engine import sampling_params

HELP = "commands: /reset  /system <text>  /show  /help  /exit   (Ctrl-C stops an answer; Ctrl-D leaves)"


class ChatSession:
    def __init__(self, loaded, generation, system: str | None = None, out=None):
        self.loaded, self.generation = loaded, generation
        self.system = system
        self.history: list[dict] = []  # user/assistant messages, oldest first
        self.last_prompt = ""
        self.out = out or sys.stdout

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def loop(self) -> None:
        self.say(HELP)
        while True:
            try:
                line = input("you> ")
            except (EOFError, KeyboardInterrupt):
                self.say("\nbye")
                return
            if not self.command(line.strip()):
                return

    def command(self, line: str) -> bool:
        """Handle one input line; False means leave."""
        if not line:
            return True
        if line in ("/exit", "/quit"):
            self.say("bye")
            return False
        if line == "/reset":
            self.history = []
            self.say("(conversation cleared)")
        elif line == "/system" or line.startswith("/system "):
            self.system = line[len("/system"):].strip() or None
            self.history = []
            self.say(f"(system prompt {'set' if self.system else 'removed'}; conversation cleared)")
        elif line == "/show":
            self.say(self.last_prompt or "(nothing sent yet)")
        elif line == "/help":
            self.say(HELP)
        elif line.startswith("/"):
            self.say(f"unknown command {line.split()[0]}; {HELP}")
        else:
            self.turn(line)
        return True

    def messages(self, question: str) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history + [{"role": "user", "content": question}]

    def turn(self, question: str) -> str:
        loaded = self.loaded
        messages = self.messages(question)
        ids = loaded.chat_ids(messages)
        budget = loaded.context_length - min(self.generation.max_new_tokens, loaded.context_length // 2)
        dropped = 0
        while len(ids) > budget and len(self.history) >= 2:
            self.history = self.history[2:]
            dropped += 1
            messages = self.messages(question)
            ids = loaded.chat_ids(messages)
        if dropped:
            self.say(f"(dropped the {dropped} oldest turn(s) to fit the model's context of {loaded.context_length} tokens)")
        if len(ids) >= loaded.context_length:
            self.say(f"(this message alone is {len(ids)} tokens, more than the model's context of {loaded.context_length}; shorten it)")
            return ""
        self.last_prompt = loaded.render(messages)
        params = sampling_params(self.generation, max_tokens=min(self.generation.max_new_tokens, loaded.context_length - len(ids)))
        parts: list[str] = []
        self.say("assistant> ", end="")
        try:
            for delta in loaded.engine.stream(ids, params):
                if delta.finish_reason == "error":
                    self.say(f"\n(generation failed: {delta.error})")
                    return ""
                parts.append(delta.text)
                self.say(delta.text, end="")
            self.say()
        except KeyboardInterrupt:  # the stream's handle is cancelled as its generator closes
            self.say(" [stopped]")
        answer = "".join(parts).strip()
        self.history += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return answer
