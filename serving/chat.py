"""Chat prompts: OpenAI chat messages -> the prompt text the model was trained on.

The `chat_template` of a checkpoint's tokenizer_config.json (Jinja, rendered as transformers renders it, in a
sandbox). A model without one gets the plain fallback: the messages' contents, each followed by a newline, in
order (roles are not spelled out), so the model continues the conversation as plain text.
"""

from __future__ import annotations

import json
from pathlib import Path

from msjax.engine.sampling_params import InvalidRequestError

ROLES = ("system", "user", "assistant", "developer", "tool")


def load_chat_template(model_path) -> str | None:
    """The Jinja chat template of a checkpoint's tokenizer_config.json, if it has one."""
    if model_path is None:
        return None
    file = Path(model_path) / "tokenizer_config.json"
    if not file.exists():
        return None
    template = json.loads(file.read_text()).get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template or None


def _special_tokens(model_path) -> dict[str, str]:
    """bos_token / eos_token as the template sees them."""
    if model_path is None or not (Path(model_path) / "tokenizer_config.json").exists():
        return {}
    cfg = json.loads((Path(model_path) / "tokenizer_config.json").read_text())
    return {k: v if isinstance(v, str) else (v or {}).get("content", "")
            for k, v in cfg.items() if k in ("bos_token", "eos_token")}


def check_messages(messages) -> list[dict]:
    """The messages with text parts joined; InvalidRequestError naming the field (e.g. messages[1].content)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages", "must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise InvalidRequestError(f"messages[{i}].role", f"must be {', '.join(ROLES[:-1])} or {ROLES[-1]}")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise InvalidRequestError(f"messages[{i}].content", "only text parts are supported")
            m = {**m, "content": "".join(p["text"] for p in content)}
        elif not isinstance(content, str):
            raise InvalidRequestError(f"messages[{i}].content", "must be a string")
        out.append(m)
    return out


class ChatTemplate:
    """A model's chat template (or the plain fallback): `render(messages, add_generation_prompt) -> str`."""

    def __init__(self, model_path=None):
        self.source = load_chat_template(model_path)
        self._special = _special_tokens(model_path)
        self._template = None

    def render(self, messages, add_generation_prompt: bool = True) -> str:
        messages = check_messages(messages)
        if self.source is None:
            return "".join(m["content"] + "\n" for m in messages)
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise InvalidRequestError("messages", message)
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.source)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **self._special)
