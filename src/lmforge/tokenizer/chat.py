"""Chat templates are Jinja strings, as in Hugging Face tokenizer configs and GGUF metadata."""
from __future__ import annotations

from functools import lru_cache

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmforge.errors import LmforgeError

# ChatML, the default for models trained here.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@lru_cache(maxsize=16)
def _compile(template: str):
    # Templates may come from untrusted model files: render them in Jinja's sandbox.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(template)


def _raise(message):
    raise LmforgeError(f"chat template: {message}")


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise LmforgeError(f"chat messages need 'role' and 'content', got {m!r}")
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)
    except TemplateError as e:
        raise LmforgeError(f"chat template failed: {e}") from e
