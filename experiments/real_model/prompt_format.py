"""Which prompt makes an instruction-tuned model answer the pass key: plain text (the eval suite's prompt, with and
without BOS) or the model's chat template (the question as the user's turn, with and without "The pass key is" begun
as the assistant's).

    python experiments/real_model/prompt_format.py --run runs/smollm2 --lengths 2048,8192 --num_samples 4

The same keys, depths and filler in every format; greedy answers through the KV cache; exact match of the first run
of digits, as `longctx.eval.passkey` scores. Prints one JSON line per (format, length) with accuracy by depth and the
answers that missed. The chat template is ChatML as SmolLM2's GGUF file (`tokenizer.chat_template`) writes it, with
its default system turn.
"""

import argparse
import json
import re

import numpy as np

from longctx.eval import passkey
from longctx.eval.tasks import with_bos
from longctx.generate import load_run
from longctx.infer.generate import Generator

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
QUESTION = " What is the pass key?"
ANSWER = "The pass key is"


def chat(user: str) -> str:
    return f"{SYSTEM}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def prompts(tokenizer, key: str, depth: float, num_filler: int) -> dict[str, np.ndarray]:
    before = round(depth * num_filler)
    context = (passkey.INTRO + passkey.FILLER * before + passkey.NEEDLE.format(key=key)
               + passkey.FILLER * (num_filler - before))
    plain = context + passkey.QUESTION
    return {"plain+bos": with_bos(tokenizer, plain), "plain": tokenizer.encode(plain),
            "chat": tokenizer.encode(chat(context.strip() + QUESTION)),
            "chat+answer": tokenizer.encode(chat(context.strip() + QUESTION) + ANSWER)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--lengths", default="2048")
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--num_samples", type=int, default=4, help="prompts per (length, depth)")
    parser.add_argument("--batch_size", type=int, default=5)
    parser.add_argument("--prefill_chunk", type=int, default=512)
    args = parser.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]
    depths = [float(d) for d in args.depths.split(",")]
    tokenizer, model, params, _ = load_run(args.run)
    generator = Generator(model, params, pad_id=tokenizer.pad_id, prefill_chunk=args.prefill_chunk,
                          max_length=max(lengths) + 64, unroll_layers=False)
    for length in lengths:
        by_format: dict[str, list[tuple[float, str, np.ndarray]]] = {}
        for depth in depths:
            for index in range(args.num_samples):
                key = passkey.random_key(np.random.default_rng([7, length, round(depth * 100), index]), 5)
                num_filler, _ = passkey.fit_filler(lambda n: passkey.render(key, depth, n), tokenizer, length)
                for name, ids in prompts(tokenizer, key, depth, num_filler).items():
                    by_format.setdefault(name, []).append((depth, key, ids))
        for name, items in by_format.items():
            answers = generator.generate_batched([ids for *_, ids in items], max_new_tokens=12,
                                                 batch_size=args.batch_size, stop_ids=[tokenizer.eos_id])
            hits: dict[float, list[bool]] = {}
            missed = []
            for (depth, key, _), answer in zip(items, answers):
                text = tokenizer.decode(answer)
                found = re.search(r"\d+", text)
                hit = bool(found and found.group() == key)
                hits.setdefault(depth, []).append(hit)
                if not hit:
                    missed.append({"depth": depth, "key": key, "answer": text})
            print(json.dumps({"format": name, "length": length, "tokens": int(np.mean([len(i) for *_, i in items])),
                              "accuracy": float(np.mean([h for v in hits.values() for h in v])),
                              "by_depth": {str(d): float(np.mean(v)) for d, v in hits.items()},
                              "missed": missed[:6]}), flush=True)


if __name__ == "__main__":
    main()
