"""The tokenizer a llama.cpp GGUF file carries (`tokenizer.ggml.*` metadata), as a `tokenizers.Tokenizer`.

GGUF stores a byte-level BPE tokenizer ("gpt2" model) as its token list, merges, token types (1 normal, 3 control,
4 user-defined) and special-token ids; `tokenizer.ggml.pre` names how llama.cpp splits text before BPE. Built here as
HF does for the same families: a BPE model over the tokens and merges, ByteLevel pre-tokenizer and decoder, control
tokens special. The pre-tokenizer follows llama.cpp's `tokenizer.ggml.pre` (llama-vocab.cpp): GPT-2's regex for
"default"/"gpt2"-like types; one token per digit first, then GPT-2's regex, for "smollm", "starcoder" and the others
of that group (SmolLM2's own tokenizer.json splits digits so too). transformers' GGUF loader ignores
`tokenizer.ggml.pre`, so on runs of digits its ids differ from these, and from the model's.
"""

import dataclasses

import gguf
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

GPT2_REGEX_TYPES = ("default", "gpt2", "gpt-2", "mpt", "olmo", "jais")
DIGIT_SPLIT_TYPES = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
CONTROL, USER_DEFINED = 3, 4


@dataclasses.dataclass(frozen=True)
class GGUFTokenizer:
    """A file's tokenizer, its BOS / EOS / PAD tokens (strings; None when the file names none) and its chat template
    (`tokenizer.chat_template`, HF's Jinja template; None when it has none)."""

    tokenizer: tokenizers.Tokenizer
    bos: str | None
    eos: str | None
    pad: str | None
    chat_template: str | None = None


def _field(fields, name: str, default=None):
    return fields[name].contents() if name in fields else default


def from_gguf(path: str) -> GGUFTokenizer:
    """The tokenizer of the GGUF file `path`; ValueError or NotImplementedError naming the field otherwise."""
    fields = gguf.GGUFReader(path).fields
    kind = _field(fields, "tokenizer.ggml.model")
    if kind is None:
        raise ValueError(f"{path}: the GGUF file has no tokenizer (tokenizer.ggml.model is missing)")
    if kind != "gpt2":
        raise NotImplementedError(f"{path}: tokenizer.ggml.model={kind!r} is not supported; longctx reads byte-level "
                                  f"BPE ('gpt2') tokenizers from GGUF files")
    pre = _field(fields, "tokenizer.ggml.pre", "default")
    if pre in GPT2_REGEX_TYPES:
        pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre in DIGIT_SPLIT_TYPES:
        pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        raise NotImplementedError(f"{path}: tokenizer.ggml.pre={pre!r} is not supported; longctx splits text as "
                                  f"llama.cpp does for {', '.join(GPT2_REGEX_TYPES + DIGIT_SPLIT_TYPES)}")
    tokens = list(_field(fields, "tokenizer.ggml.tokens"))
    merges = [tuple(merge.split(" ", 1)) for merge in _field(fields, "tokenizer.ggml.merges", [])]
    types = list(_field(fields, "tokenizer.ggml.token_type", [1] * len(tokens)))
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges,
                                                fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_tokens([tokenizers.AddedToken(tokens[i], special=types[i] == CONTROL, normalized=False)
                          for i in range(len(tokens)) if types[i] in (CONTROL, USER_DEFINED)])

    def special(role: str) -> str | None:
        token_id = _field(fields, f"tokenizer.ggml.{role}_token_id")
        return None if token_id is None else tokens[int(token_id)]

    return GGUFTokenizer(tokenizer, special("bos"), special("eos"), special("padding"),
                         _field(fields, "tokenizer.chat_template"))
