"""Chat-template prompts (longctx.data.chat): rendered as transformers renders them, and the eval's prompts in them."""

import numpy as np
import pytest

from longctx.data import ChatPrompts, load_tokenizer
from longctx.data.chat import render_chat
from longctx.data.tokenizers import ANSWER_MARK
from longctx.eval import passkey

import gguf_files

CHATML = gguf_files.CHAT_TEMPLATE
# A Llama-2-like template: BOS from the tokenizer, whitespace control that trim_blocks / lstrip_blocks settle.
LLAMA2 = ("{{ bos_token }}{% for message in messages %}\n    {% if message['role'] == 'user' %}"
          "[INST] {{ message['content'] }} [/INST]{% endif %}\n{% endfor %}")


def test_templates_render_as_transformers_renders_them():
    """Golden strings: what transformers' apply_chat_template(..., tokenize=False) gives for these templates."""
    assert render_chat(CHATML, [{"role": "user", "content": "Hi"}], add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(LLAMA2, [{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                       bos_token="<s>") == "<s>[INST] Hi [/INST]"


def test_templates_see_what_transformers_gives_them():
    """tools and documents None, tojson keeping non-ASCII text, strftime_now, the special tokens as variables."""
    template = ("{% if tools is not none %}[TOOLS]{% endif %}{{ messages[0]['content'] | tojson }}"
                "{{ strftime_now('%Y') | length }}{{ pad_token }}")
    assert render_chat(template, [{"role": "user", "content": "a<b é"}], add_generation_prompt=False,
                       pad_token="<pad>") == '"a<b é"4<pad>'


def test_only_the_last_answer_mark_splits_a_prompt(chat_tokenizer):
    """A haystack may hold the mark's character itself: plain prompts keep it as before, chat prompts split at the
    task's own mark, the last one."""
    text = f"noise {ANSWER_MARK} noise. What is it?{ANSWER_MARK} It is"
    plain = chat_tokenizer.encode(f"noise {ANSWER_MARK} noise. What is it? It is")
    assert chat_tokenizer.prompt(text).tolist() == [chat_tokenizer.bos_id, *plain.tolist()]
    chat = ChatPrompts(chat_tokenizer)
    assert chat_tokenizer.decode(chat.prompt(text)).endswith("What is it?\nassistant\nIt is")


@pytest.fixture
def chat_tokenizer(tmp_path):
    """The byte-level BPE of a GGUF test file, whose chat template is SmolLM2's."""
    tokenizer = load_tokenizer(str(gguf_files.write_tokenizer(tmp_path / "tokenizer.gguf")))
    assert tokenizer.chat_template == CHATML
    return tokenizer


def test_a_chat_prompt_is_the_users_turn_and_the_assistants_opening(chat_tokenizer):
    chat = ChatPrompts(chat_tokenizer)
    ids = chat.prompt("the lazy dog")
    im_start, im_end = chat_tokenizer.bos_id, chat_tokenizer.eos_id
    assert ids[0] == im_start and list(ids).count(im_start) == 3 and list(ids).count(im_end) == 2
    assert ids.tolist() == chat_tokenizer.encode(render_chat(
        CHATML, [{"role": "user", "content": "the lazy dog"}], add_generation_prompt=True)).tolist()
    head = chat.prompt("the lazy dog", whole=False)
    assert ids[:len(head)].tolist() == head.tolist() and head[-1] != im_end
    assert chat.decode(ids).endswith("assistant\n") and chat.vocab_size == chat_tokenizer.vocab_size


def test_pass_key_prompts_in_the_chat_template_fit_and_point_at_the_needle(chat_tokenizer):
    chat = ChatPrompts(chat_tokenizer)
    samples = passkey.build(chat, [600], [0.0, 1.0], num_samples=1)
    for sample in samples:
        assert len(sample.prompt) <= 600 and sample.prompt[0] == chat_tokenizer.bos_id
        text = chat_tokenizer.decode(sample.prompt)
        # the question closes the user's turn; the assistant's begins the answer (special tokens dropped by decode)
        assert text.endswith(" What is the pass key?\nassistant\nThe pass key is")
        assert text.startswith("system\nYou are a helpful")
        needle = chat_tokenizer.encode(passkey.NEEDLE.format(key=sample.info["key"]))
        start = sample.info["needle_position"]
        assert sample.prompt[start:start + len(needle) - 1].tolist() == needle[:-1].tolist()


def test_a_tokenizer_without_a_template_is_refused():
    with pytest.raises(ValueError, match="has no chat template"):
        ChatPrompts(load_tokenizer("byte"))


def test_the_template_survives_saving(chat_tokenizer, tmp_path):
    (tmp_path / "saved").mkdir()
    chat_tokenizer.save(tmp_path / "saved")
    saved = load_tokenizer(str(tmp_path / "saved" / "tokenizer.json"))
    assert saved.chat_template == CHATML
    np.testing.assert_array_equal(ChatPrompts(saved).prompt("x"), ChatPrompts(chat_tokenizer).prompt("x"))
