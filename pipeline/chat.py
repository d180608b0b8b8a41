"""One prompt renderer for training, serving and export: chat messages -> the text a causal LM reads.

With a chat template the tokenizer's own template renders the messages. Without one (GPT-2 and
other base models) the plain transcript is ``Role: content`` lines joined by newlines, and the
generation prompt is a last ``Assistant:`` line with no trailing space: a training example's
full text (``... \\nAssistant: <target>``) then starts with exactly the generation prompt, so the
tokens a student learns to continue are the tokens it is served (byte-level BPE merges the space
into the target's first token, ``" 1"``; a trailing space in the prompt would be a token the
student never saw before its answer).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
GENERATION_PROMPT = "Assistant:"


def plain_transcript(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    """``System: ...\\nUser: ...[\\nAssistant:]``: the rendering for tokenizers without a chat template."""
    lines = [f"{ROLE_NAMES.get(m['role'], str(m['role']).title())}: {m['content']}" for m in messages]
    if add_generation_prompt:
        lines.append(GENERATION_PROMPT)
    return "\n".join(lines)


def render_chat(tokenizer: Optional[Any], messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    """The prompt text of ``messages``: the tokenizer's chat template when it has one, else
    :func:`plain_transcript`. Only ``role`` and ``content`` of each message are rendered."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    return plain_transcript(msgs, add_generation_prompt)
