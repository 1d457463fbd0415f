"""Tokenizers: round trips, specials, and the errors of `load_tokenizer` (tokenizer files are built in the test)."""

import numpy as np
import pytest
import sentencepiece
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from longctx.data import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, load_tokenizer

SENTENCES = ["the quick brown fox jumps over the lazy dog", "a lazy dog sleeps under the old green tree",
             "seven small birds sing in the morning", "rivers run to the sea under a pale moon"] * 4
TEXT = "héllo wörld — 日本語 🙂\n\tdef f(): return 1"


def write_bpe(path, special_tokens) -> str:
    """A byte-level BPE tokenizer.json trained on SENTENCES with `special_tokens` added."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(SENTENCES, trainer)
    tokenizer.save(str(path))
    return str(path)


def write_sentencepiece(directory, **options) -> str:
    """A tiny sentencepiece BPE model trained on SENTENCES; `options` go to the trainer (e.g. pad_id=3)."""
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES) + "\n")
    prefix = directory / "sp"
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(prefix), vocab_size=64,
                                             model_type="bpe", hard_vocab_limit=False, minloglevel=2, **options)
    return f"{prefix}.model"


def test_byte_round_trip_with_non_ascii():
    tokenizer = load_tokenizer("byte")
    ids = tokenizer.encode(TEXT)
    assert isinstance(tokenizer, ByteTokenizer)
    assert ids.dtype == np.int32 and len(ids) == len(TEXT.encode("utf-8"))
    assert ids.min() >= 0 and ids.max() < 256
    assert tokenizer.decode(ids) == TEXT
    assert [a.tolist() for a in tokenizer.encode_batch([TEXT, ""])] == [ids.tolist(), []]


def test_byte_specials_lie_outside_the_bytes_and_decode_skips_them():
    tokenizer = ByteTokenizer()
    assert tokenizer.vocab_size == 259
    assert {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id} == {256, 257, 258}
    ids = tokenizer.encode("abc")
    framed = np.concatenate([[tokenizer.bos_id], ids, [tokenizer.eos_id, tokenizer.pad_id]])
    assert tokenizer.decode(framed) == "abc"
    assert tokenizer.decode([0xFF, ord("a")]) == "\ufffda"  # An invalid UTF-8 byte is replaced, not fatal.


def test_hf_tokenizer_json_loads_and_round_trips(tmp_path):
    path = write_bpe(tmp_path / "tokenizer.json", ["<pad>", "<s>", "</s>"])
    tokenizer = load_tokenizer(path)
    raw = tokenizers.Tokenizer.from_file(path)
    assert isinstance(tokenizer, HFTokenizer)
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (
        raw.token_to_id("<pad>"), raw.token_to_id("<s>"), raw.token_to_id("</s>"))
    assert tokenizer.vocab_size == raw.get_vocab_size()
    for text in (SENTENCES[0], "the dog, 日本 🙂"):
        ids = tokenizer.encode(text)
        assert ids.dtype == np.int32
        assert not np.isin(ids, [tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id]).any()
        assert tokenizer.decode(np.concatenate([[tokenizer.bos_id], ids, [tokenizer.eos_id]])) == text
    batch = tokenizer.encode_batch(SENTENCES[:3])
    assert [b.tolist() for b in batch] == [tokenizer.encode(s).tolist() for s in SENTENCES[:3]]


def test_hf_specials_gpt2_style_fall_back_and_can_be_named(tmp_path):
    gpt2_style = HFTokenizer(write_bpe(tmp_path / "gpt2.json", ["<|endoftext|>"]))
    assert gpt2_style.bos_id == gpt2_style.eos_id == gpt2_style.pad_id  # PAD falls back to EOS.
    named = HFTokenizer(write_bpe(tmp_path / "custom.json", ["[BOS]", "[EOS]"]), bos="[BOS]", eos="[EOS]")
    assert named.bos_id != named.eos_id == named.pad_id
    with pytest.raises(ValueError, match="BOS token '<nope>' is not in its vocabulary"):
        HFTokenizer(str(tmp_path / "custom.json"), bos="<nope>", eos="[EOS]")


def test_hf_without_bos_or_eos_is_a_clear_error(tmp_path):
    path = write_bpe(tmp_path / "tokenizer.json", ["[UNK]"])
    with pytest.raises(ValueError, match=r"data.tokenizer.*cannot tell its BOS token.*bos=<token>"):
        load_tokenizer(path)


def test_sentencepiece_model_loads_and_round_trips(tmp_path):
    tokenizer = load_tokenizer(write_sentencepiece(tmp_path))
    assert isinstance(tokenizer, SentencePieceTokenizer)
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)  # sentencepiece's defaults: unk 0, bos 1, eos 2.
    assert tokenizer.pad_id == tokenizer.eos_id  # The model has no pad (pad_id() == -1).
    ids = tokenizer.encode(SENTENCES[1])
    assert ids.dtype == np.int32 and not np.isin(ids, [1, 2]).any()
    assert tokenizer.decode(np.concatenate([[1], ids, [2]])) == SENTENCES[1]
    assert [b.tolist() for b in tokenizer.encode_batch(SENTENCES[:2])] == [
        tokenizer.encode(s).tolist() for s in SENTENCES[:2]]


def test_sentencepiece_model_pad(tmp_path):
    assert SentencePieceTokenizer(write_sentencepiece(tmp_path, pad_id=3)).pad_id == 3


@pytest.mark.parametrize("name", ["missing.json", "missing.model"])
def test_missing_tokenizer_file(tmp_path, name):
    with pytest.raises(FileNotFoundError, match=f"data.tokenizer: no such file '.*{name}'"):
        load_tokenizer(str(tmp_path / name))


@pytest.mark.parametrize("spec", ["gpt2", "bytes", "vocab.txt", ""])
def test_unknown_tokenizer_spec_lists_what_is_allowed(spec):
    with pytest.raises(ValueError, match=r'data.tokenizer must be "byte", a path to a HF tokenizer.json, a path to a '
                                         r"sentencepiece .model, or a path to a GGUF model file"):
        load_tokenizer(spec)


def test_unreadable_tokenizer_file(tmp_path):
    for name in ("tokenizer.json", "sp.model"):
        (tmp_path / name).write_text("not a tokenizer")
        with pytest.raises(ValueError, match=f"data.tokenizer: cannot load .*{name}"):
            load_tokenizer(str(tmp_path / name))
