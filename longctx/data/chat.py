"""Prompts in a model's chat template: the question as the user's turn, the assistant's turn opened after it with
the answer's lead-in.

An instruction-tuned model may answer a question only when it is asked as its chat template frames a conversation
(SmolLM2-Instruct repeats "the pass key" after a plain pass-key prompt whose needle ends the context, and answers the
same prompt as a user's turn). `ChatPrompts(tokenizer)` is the tokenizer whose `prompt(text)` renders the template
HF's way (`transformers`' `apply_chat_template`: Jinja in a sandbox, `trim_blocks` and `lstrip_blocks`, messages
`[{"role": "user", "content": text}]`, `add_generation_prompt=True`, the tokenizer's `bos_token` and `eos_token`) and
tokenizes the result, the template's special tokens included; everything else is the wrapped tokenizer's. A task's
text marks where its question ends and the answer's lead-in begins (`ANSWER_MARK`, as RULER's templates keep an
`answer_prefix` apart): the lead-in opens the assistant's turn, as RULER prompts chat models, so "...What is the pass
key?" is asked and "The pass key is" begun by the assistant.
"""

import datetime
import json
from collections.abc import Sequence

import jinja2
import jinja2.sandbox
import numpy as np

from longctx.data.tokenizers import Tokenizer, split_at_answer

_CONTENT = "\x00longctx user content\x00"  # stands for the text while the template is rendered once


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool, **special_tokens: str) -> str:
    """`template` rendered as transformers renders chat templates: its globals `raise_exception` and `strftime_now`,
    `tojson` keeping non-ASCII text, `tools` and `documents` None, and the tokenizer's special tokens
    (`bos_token=...`, `eos_token=...`) as variables."""
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                               extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.datetime.now().strftime(format)
    return environment.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                    tools=None, documents=None, **special_tokens)


class ChatPrompts(Tokenizer):
    """`tokenizer` whose prompts are single user turns of its chat template (module docstring)."""

    def __init__(self, tokenizer: Tokenizer):
        if not tokenizer.chat_template:
            raise ValueError(f"the tokenizer {tokenizer.name!r} has no chat template (HF: tokenizer_config.json's "
                             f"chat_template; GGUF: tokenizer.chat_template); use plain prompts")
        self.base = tokenizer
        self.name, self.vocab_size, self.chat_template = tokenizer.name, tokenizer.vocab_size, tokenizer.chat_template
        self.bos_id, self.eos_id, self.pad_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
        special = {name: tokenizer.token_string(token_id) for name, token_id in
                   (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id), ("pad_token", tokenizer.pad_id))}
        rendered = render_chat(tokenizer.chat_template, [{"role": "user", "content": _CONTENT}],
                               add_generation_prompt=True, **special)
        if rendered.count(_CONTENT) != 1:
            raise ValueError(f"the chat template of {tokenizer.name!r} does not place a user message's content once")
        self.head, self.tail = rendered.split(_CONTENT)

    def encode(self, text: str) -> np.ndarray:
        return self.base.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return self.base.encode_batch(texts)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self.base.decode(ids)

    def prompt(self, text: str, *, whole: bool = True) -> np.ndarray:
        """ids of the template's opening, `text` up to its (last) `ANSWER_MARK` as the user's turn, and (if `whole`)
        the turn's close, the assistant's opening and the text after the mark."""
        question, lead = split_at_answer(text)
        if not whole:
            return self.base.encode(self.head + question).astype(np.int32)
        return self.base.encode(self.head + question.rstrip() + self.tail + lead.lstrip()).astype(np.int32)
