"""Chat messages to a prompt: the checkpoint's chat template, or a documented default.

Hugging Face checkpoints keep their template (Jinja) as ``chat_template`` in tokenizer_config.json;
it is rendered in a sandbox with ``messages``, ``add_generation_prompt=True``, ``bos_token`` and
``eos_token``, as transformers does. Without one, the default template below is used:

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n<|assistant|>\\n{content}\\n ... <|assistant|>\\n

The rendered text is tokenized with the BOS token prepended once (a template that writes the BOS
token's text itself has it removed first, so that it is not there twice).
"""

from __future__ import annotations

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.errors import CheckpointError, RequestError

DEFAULT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ROLES = ("system", "user", "assistant")


class ChatError(RequestError):
    def __init__(self, message: str, param: str = "messages"):
        super().__init__(message, param)


def _raise(message: str):
    raise ChatError(f"chat template: {message}")


def validate(messages) -> list[dict]:
    """Messages as [{"role", "content": str}], text parts of a content list joined."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatError(f"messages[{i}] must be an object")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ChatError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if isinstance(content, list):
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in content
            ):
                raise ChatError(f"messages[{i}].content parts must be {{'type': 'text', 'text': str}}")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ChatError(f"messages[{i}].content must be a string or a list of text parts")
        out.append({"role": role, "content": content})
    return out


class ChatFormatter:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        source = tokenizer.chat_template or DEFAULT_TEMPLATE
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise CheckpointError(f"chat_template in tokenizer_config.json does not parse: {e}") from None
        sp = tokenizer.sp
        self.bos = sp.id_to_piece(tokenizer.bos_id) if tokenizer.bos_id is not None else ""
        self.eos = sp.id_to_piece(tokenizer.eos_id) if tokenizer.eos_id is not None else ""

    def render(self, messages: list[dict]) -> str:
        try:
            return self.template.render(
                messages=messages, add_generation_prompt=True, bos_token=self.bos, eos_token=self.eos
            )
        except ChatError:
            raise
        except jinja2.TemplateError as e:
            raise ChatError(f"chat template failed: {e}") from None

    def prompt_ids(self, messages) -> list[int]:
        text = self.render(validate(messages))
        if self.bos and text.startswith(self.bos):
            text = text[len(self.bos) :]
        return self.tokenizer.encode(text)
