"""Next-token choice: greedy, temperature and top-p against a numpy oracle; sampled generation is seeded; the
`python -m longctx.generate` command line."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longctx import positions
from longctx.infer.generate import Generator
from longctx.infer.sampling import Sampling, next_tokens, nucleus_logits
from longctx.models import Llama, LlamaConfig, init_params
from longctx.train import train


def oracle_distribution(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """The sampling distribution, computed directly: softmax at the temperature, the smallest most-probable set of
    mass >= top_p (ties by token order), renormalised."""
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = sorted(range(len(p)), key=lambda i: (-p[i], i))
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += p[i]
        if mass >= top_p:
            break
    q = np.zeros_like(p)
    q[kept] = p[kept]
    return q / q.sum()


def test_temperature_zero_is_argmax():
    logits = jax.random.normal(jax.random.key(0), (5, 50))
    np.testing.assert_array_equal(next_tokens(logits, jax.random.key(1), Sampling()), np.argmax(logits, axis=-1))


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.75, 0.99, 1.0])
def test_nucleus_keeps_the_smallest_most_probable_set(top_p):
    logits = np.asarray(jax.random.normal(jax.random.key(2), (4, 30)) * 2, np.float64)
    kept = np.isfinite(np.asarray(nucleus_logits(jnp.asarray(logits, jnp.float32), top_p)))
    for row, mask in zip(logits, kept):
        np.testing.assert_array_equal(mask, oracle_distribution(row, 1.0, top_p) > 0)


def test_sampled_frequencies_follow_the_distribution():
    logits = np.array([2.0, 1.5, 1.0, 0.2, -0.5, -3.0])
    sampling = Sampling(temperature=0.7, top_p=0.9)
    draws = 40_000
    tokens = next_tokens(jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (draws, len(logits))),
                         jax.random.key(3), sampling)
    frequencies = np.bincount(np.asarray(tokens), minlength=len(logits)) / draws
    np.testing.assert_allclose(frequencies, oracle_distribution(logits, 0.7, 0.9), atol=0.012)  # ~5 sigma


@pytest.mark.parametrize("kwargs, field", [({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
                                           ({"top_p": 1.5}, "top_p")])
def test_bad_sampling_is_refused(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Sampling(**kwargs)


def test_sampled_generation_is_seeded_and_a_tiny_nucleus_is_greedy():
    config = LlamaConfig(vocab_size=41, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, attention_impl="xla")
    model = Llama(config, position_scheme=positions.get("rope", head_dim=16))
    params = init_params(model, jax.random.key(0))[0]
    prompts = [np.array([3, 5, 7, 9], np.int32), np.array([1, 2], np.int32)]

    def run(sampling, seed=0):
        generator = Generator(model, params, pad_id=0, sampling=sampling, seed=seed)
        return [list(c) for c in generator.generate(prompts, max_new_tokens=12)]

    hot = Sampling(temperature=2.0)
    assert run(hot, seed=0) == run(hot, seed=0)
    assert run(hot, seed=0) != run(hot, seed=1)
    assert run(Sampling(temperature=1.0, top_p=1e-6)) == run(Sampling())


def test_command_line_generates_from_a_prompt_file(tmp_path, make_config):
    """`python -m longctx.generate` continues a prompt file with a trained run; bad input is refused by name."""
    workdir = tmp_path / "run"
    train(make_config(**{"train.steps": 2}), workdir)
    (tmp_path / "prompt.txt").write_text("the quick brown fox")
    command = [sys.executable, "-m", "longctx.generate", f"--workdir={workdir}", "--max_new_tokens=8"]
    done = subprocess.run([*command, f"--prompt-file={tmp_path / 'prompt.txt'}", "--temperature=0.8"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()  # eight byte-tokens of text (a 2-step model: anything)
    missing = subprocess.run([*command, f"--prompt-file={tmp_path / 'none.txt'}"], capture_output=True, text=True)
    assert missing.returncode != 0 and "--prompt-file: no such file" in missing.stderr
    bad = subprocess.run([*command, f"--prompt-file={tmp_path / 'prompt.txt'}", "--top_p=0"], capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "top_p must be in (0, 1]" in bad.stderr
