"""Tokenizers: bytes (the default), a HF `tokenizer.json`, or a sentencepiece `.model`; `load_tokenizer` picks one.

Every tokenizer maps text to int32 ids without adding special tokens; `longctx.data.packing` adds BOS and EOS around
each document itself, so every tokenizer frames documents the same way. `decode` drops BOS, EOS and PAD.
"""

import abc
import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np
import sentencepiece
import tokenizers

from longctx.data.gguf_tokenizer import from_gguf

ALLOWED_SPECS = ('"byte", a path to a HF tokenizer.json, a path to a sentencepiece .model, or a path to a GGUF model '
                 'file (its tokenizer)')
HF_BOS_NAMES = ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "<|endoftext|>")
HF_EOS_NAMES = ("</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>")
HF_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")
HF_CONFIG_FILE = "tokenizer_config.json"  # Beside an HF tokenizer.json: its bos_token, eos_token, pad_token.
HF_TEMPLATE_FILE = "chat_template.jinja"  # Beside it too, in newer HF directories: the chat template.
# In a prompt's text, where the question ends and the answer's lead-in begins (" The pass key is"): a plain prompt
# drops it, a chat prompt starts the assistant's turn with what follows it (`longctx.data.chat`). Only the last one
# counts: a haystack may hold the character itself.
ANSWER_MARK = "\x1f"


def split_at_answer(text: str) -> tuple[str, str]:
    """(question, answer's lead-in) of a prompt's text: around its last `ANSWER_MARK` (lead-in "" without one)."""
    question, mark, lead = text.rpartition(ANSWER_MARK)
    return (question, lead) if mark else (text, "")


class Tokenizer(abc.ABC):
    """Text ↔ int32 ids. Attributes: `vocab_size`, `bos_id`, `eos_id`, `pad_id` (ids < vocab_size), `name`."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    name: str
    chat_template: str | None = None  # HF's Jinja chat template, where the tokenizer's files carry one

    def prompt(self, text: str, *, whole: bool = True) -> np.ndarray:
        """int32 ids of `text` as a prompt: [BOS] + encode(text), as packing frames every training document, with the
        `ANSWER_MARK` it may hold dropped. `whole` matters to prompts that close after the text
        (`longctx.data.chat.ChatPrompts`): False gives the ids only up to the text's end (where a needle sits)."""
        return np.concatenate([[self.bos_id], self.encode("".join(split_at_answer(text)))]).astype(np.int32)

    @abc.abstractmethod
    def encode(self, text: str) -> np.ndarray:
        """int32 ids [n] of `text`, no special tokens added."""

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`[encode(t) for t in texts]`; subclasses override it with a faster path."""
        return [self.encode(text) for text in texts]

    @abc.abstractmethod
    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of `ids` [n], BOS/EOS/PAD dropped."""

    def token_string(self, token_id: int) -> str:
        """The vocabulary's string for `token_id` (a special token's name, as a chat template writes it)."""
        raise NotImplementedError(f"{type(self).__name__} has no strings for its token ids")

    def frame(self, ids: Sequence[int] | np.ndarray, dtype=np.int32) -> np.ndarray:
        """`[BOS] + ids + [EOS]` as `dtype`: how every document enters training, whatever the tokenizer."""
        framed = np.empty(len(ids) + 2, dtype=dtype)
        framed[0], framed[1:-1], framed[-1] = self.bos_id, ids, self.eos_id
        return framed

    def _without_specials(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).ravel()
        return ids[~np.isin(ids, (self.bos_id, self.eos_id, self.pad_id))]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
                f"eos={self.eos_id}, pad={self.pad_id})")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: ids 0..255 are bytes, PAD=256, BOS=257, EOS=258; vocab_size 259."""

    vocab_size = 259
    pad_id = 256
    bos_id = 257
    eos_id = 258
    name = "byte"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = np.asarray(ids).ravel()
        return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A HF `tokenizer.json` through the `tokenizers` library.

    BOS/EOS/PAD are the given token strings, else those the `tokenizer_config.json` beside the file names (as HF's
    AutoTokenizer reads them), else the first of the usual names (`HF_BOS_NAMES`, ...) that the tokenizer marks
    special, else the first that is in its vocabulary at all. PAD falls back to EOS. The chat template is the given
    one, else that file's `chat_template`.
    """

    def __init__(self, path: str, *, bos: str | None = None, eos: str | None = None, pad: str | None = None,
                 tokenizer: tokenizers.Tokenizer | None = None, chat_template: str | None = None):
        """`tokenizer`: one already built (`path` then only names it), else the tokenizer.json at `path`."""
        self.name = str(path)
        self._tokenizer = tokenizer or tokenizers.Tokenizer.from_file(str(path))
        self._named_in = ""
        if tokenizer is None:
            named = _special_tokens_beside(pathlib.Path(path))
            if (bos, eos, pad) == (None, None, None) and named:
                self._named_in = f" (named by {pathlib.Path(path).parent / HF_CONFIG_FILE})"
            bos, eos, pad = bos or named.get("bos"), eos or named.get("eos"), pad or named.get("pad")
            chat_template = chat_template or named.get("chat_template")
        self.chat_template = chat_template
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._special_id("BOS", bos, HF_BOS_NAMES)
        self.eos_id = self._special_id("EOS", eos, HF_EOS_NAMES)
        self.pad_id = self._special_id("PAD", pad, HF_PAD_NAMES, default=self.eos_id)

    def _special_id(self, role: str, token: str | None, names: Sequence[str], default: int | None = None) -> int:
        if token is not None:
            token_id = self._tokenizer.token_to_id(token)
            if token_id is None:
                raise ValueError(f"{self.name}: the {role} token {token!r}{self._named_in} is not in its vocabulary")
            return token_id
        specials = {t.content: i for i, t in self._tokenizer.get_added_tokens_decoder().items() if t.special}
        for name in names:
            if name in specials:
                return specials[name]
        for name in names:
            token_id = self._tokenizer.token_to_id(name)
            if token_id is not None:
                return token_id
        if default is not None:
            return default
        raise ValueError(f"{self.name}: cannot tell its {role} token: none of {', '.join(names)} is in its "
                         f"vocabulary; name it with HFTokenizer(path, {role.lower()}=<token>)")

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self._tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tokenizer.decode(self._without_specials(ids).tolist(), skip_special_tokens=True)

    def token_string(self, token_id: int) -> str:
        return self._tokenizer.id_to_token(token_id) or ""

    def save(self, directory: str | os.PathLike) -> None:
        """Writes the tokenizer into `directory` as HF does: tokenizer.json, and tokenizer_config.json naming its
        BOS / EOS / PAD (and its chat template), so that this class and transformers' AutoTokenizer read the same
        special tokens back."""
        directory = pathlib.Path(directory)
        self._tokenizer.save(str(directory / "tokenizer.json"))
        roles = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id}
        named = {role: self._tokenizer.id_to_token(token_id) for role, token_id in roles.items()}
        if self.chat_template:
            named["chat_template"] = self.chat_template
        (directory / HF_CONFIG_FILE).write_text(json.dumps(named, indent=2) + "\n")


def _special_tokens_beside(path: pathlib.Path) -> dict[str, str]:
    """The BOS / EOS / PAD token strings ("bos", "eos", "pad") and the "chat_template" the tokenizer_config.json
    beside `path` names."""
    config_path = path.parent / HF_CONFIG_FILE
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from None
    named = {}
    for role in ("bos", "eos", "pad"):
        token = config.get(f"{role}_token")
        token = token.get("content") if isinstance(token, dict) else token  # older files: an AddedToken's fields
        if isinstance(token, str):
            named[role] = token
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if (path.parent / HF_TEMPLATE_FILE).is_file():  # newer transformers write the template apart
        template = (path.parent / HF_TEMPLATE_FILE).read_text()
    if isinstance(template, str):
        named["chat_template"] = template
    return named


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model`; BOS/EOS/PAD are the model's own, PAD falling back to EOS when it has none."""

    def __init__(self, path: str):
        self.name = str(path)
        self._processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self._processor.get_piece_size()
        self.bos_id, self.eos_id = self._processor.bos_id(), self._processor.eos_id()
        for role, token_id in (("BOS", self.bos_id), ("EOS", self.eos_id)):
            if token_id < 0:
                raise ValueError(f"{self.name}: the model has no {role} token (train it with {role.lower()}_id >= 0)")
        self.pad_id = self._processor.pad_id() if self._processor.pad_id() >= 0 else self.eos_id

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._processor.encode(text, add_bos=False, add_eos=False), dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        ids = self._processor.encode(list(texts), add_bos=False, add_eos=False)
        return [np.asarray(i, dtype=np.int32) for i in ids]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._processor.decode(self._without_specials(ids).tolist())


def gguf_tokenizer(path: str) -> HFTokenizer:
    """The tokenizer a GGUF model file carries (`gguf_tokenizer.from_gguf`), with the file's BOS / EOS / PAD."""
    found = from_gguf(path)
    return HFTokenizer(path, bos=found.bos, eos=found.eos, pad=found.pad, tokenizer=found.tokenizer,
                       chat_template=found.chat_template)


def load_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer that `data.tokenizer` names: "byte", a `*.json` (HF) path, a `*.model` (sentencepiece) path or a
    `*.gguf` path (the model file's own tokenizer).

    Raises FileNotFoundError for a missing file and ValueError for any other spec, or a file that does not load.
    """
    if spec == "byte":
        return ByteTokenizer()
    kinds = {".json": HFTokenizer, ".model": SentencePieceTokenizer, ".gguf": gguf_tokenizer}
    suffix = os.path.splitext(spec)[1]
    if suffix not in kinds:
        raise ValueError(f"data.tokenizer must be {ALLOWED_SPECS}; got {spec!r}")
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"data.tokenizer: no such file {spec!r}")
    try:
        return kinds[suffix](spec)
    except Exception as error:  # The libraries raise bare Exception / RuntimeError / OSError on a bad file.
        raise ValueError(f"data.tokenizer: cannot load {spec!r} as a {kinds[suffix].__name__}: {error}") from error
