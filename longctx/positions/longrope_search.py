"""LongRoPE's search: rescale factors of one's own for a model, found by evolution on its perplexity.

Ding et al., "LongRoPE: Extending LLM Context Window Beyond 2 Million Tokens" (2024), §3.2 and Algorithm 1. The
extended scheme divides each rotary frequency by its own factor, inv_freq_i = theta^(-2i/R) / λ_i (`LongRoPE`'s
`long_factor`); the search looks for the λ that give the lowest perplexity at the target length:

- the initial population is PI (λ_i = s), NTK-aware scaling (λ_i = s^(2i/(R-2)), the base change of a factor s)
  and YaRN's λ (`LongRoPE`'s default long factors), then mutations of those three;
- each generation keeps the `num_parents` best, and makes children by mutation (each λ_i multiplied by
  exp(N(0, mutation_scale)) with probability `mutation_rate`) and by crossover (each λ_i from one of two parents);
- every candidate obeys the paper's constraints: 1 ≤ λ_i ≤ 1.25 · s, and λ non-decreasing in i (lower frequencies
  are stretched at least as much), enforced by clipping and a running maximum rather than by rejection.

The paper also searches n̂, a number of leading positions left unscaled; `LongRoPE` (as HF's "longrope") has no such
window, so neither does the search. Candidates are scored by one compiled forward: the factors enter the model as a
variable (`SearchedLongRoPE`), not as constants, so the whole search compiles once.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from longctx.positions.rope import inverse_powers
from longctx.positions.rope_scaling import LongRoPE

COLLECTION = "longrope_search"  # the variable collection the searched factors are passed in


class SearchedLongRoPE(LongRoPE):
    """`LongRoPE` whose long factors come from the `COLLECTION` variable "long_factor" [R/2] (a traced value: one
    compiled forward scores every candidate), not from the `long_factor` field. Not registered: a search tool."""

    def setup(self):
        self.long_factors = self.variable(COLLECTION, "long_factor", lambda: jnp.asarray(self.rescale_factors(True)))

    def traced_inv_freq(self, seq_len: jax.Array) -> jax.Array:
        factors = self.long_factors.value
        base = jnp.asarray(inverse_powers(self.theta, self.exponents()), jnp.float32)
        long = seq_len > self.original_max_position_embeddings
        return jnp.where(long, base / factors.astype(jnp.float32), jnp.asarray(self._inv_freq(False)))


def ntk_factors(scheme: LongRoPE) -> np.ndarray:
    """λ of NTK-aware scaling by `scheme.factor`: theta · s^(R/(R-2)) as the base, i.e. λ_i = s^(2i/(R-2))."""
    half = scheme.rotary_dim // 2
    return (scheme.factor ** (2 * np.arange(half) / max(1, scheme.rotary_dim - 2))).astype(np.float32)


def constrained(factors: np.ndarray, scale: float) -> np.ndarray:
    """`factors` within [1, 1.25 · scale] and non-decreasing (LongRoPE's constraints)."""
    return np.maximum.accumulate(np.clip(factors, 1.0, 1.25 * scale)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    population: int = 32
    generations: int = 10
    num_parents: int = 8
    mutation_rate: float = 0.3
    mutation_scale: float = 0.1
    seed: int = 0

    def __post_init__(self):
        for name in ("population", "generations", "num_parents"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"longrope search: {name} must be a positive int, got {value!r}")
        if self.num_parents > self.population:
            raise ValueError(f"longrope search: num_parents ({self.num_parents}) must not exceed population "
                             f"({self.population})")
        if not 0 < self.mutation_rate <= 1 or not self.mutation_scale > 0:
            raise ValueError(f"longrope search: mutation_rate must be in (0, 1] and mutation_scale > 0, got "
                             f"{self.mutation_rate}, {self.mutation_scale}")


@dataclasses.dataclass(frozen=True)
class SearchResult:
    long_factor: np.ndarray  # [R/2] float32, the best λ found
    loss: float  # its mean next-token loss on the search windows
    starts: dict[str, float]  # the loss of each starting point: "pi", "ntk", "yarn"
    history: list[float]  # the best loss after each generation


def perplexity_objective(model, params, windows: np.ndarray) -> Callable[[np.ndarray], float]:
    """The mean next-token loss of `model` (whose position scheme is a `SearchedLongRoPE`) on `windows` [n, L] as a
    function of the long factors; compiled once for every candidate."""
    if not isinstance(model.position_scheme, SearchedLongRoPE):
        raise ValueError(f"the search scores a model whose position scheme is SearchedLongRoPE, not "
                         f"{type(model.position_scheme).__name__}")

    @jax.jit
    def loss(factors, tokens):
        variables = {"params": params, COLLECTION: {"position_scheme": {"long_factor": factors}}}
        logits = model.apply(variables, tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    tokens = jnp.asarray(windows, jnp.int32)

    def objective(factors: np.ndarray) -> float:
        return float(loss(jnp.asarray(factors, jnp.float32), tokens))

    objective.compiled = loss  # its cache counts the compilations
    return objective


def search(objective: Callable[[np.ndarray], float], scheme: LongRoPE,
           config: SearchConfig = SearchConfig()) -> SearchResult:
    """LongRoPE's evolution search for `scheme` (its theta, factor s, rotary width and original length) minimising
    `objective(λ)`; deterministic for a seed."""
    rng = np.random.default_rng(config.seed)
    s = float(scheme.factor)
    starts = {"pi": np.full(scheme.rotary_dim // 2, s, np.float32), "ntk": ntk_factors(scheme),
              "yarn": scheme.rescale_factors(long=True)}
    starts = {name: constrained(factors, s) for name, factors in starts.items()}
    scored: dict[bytes, tuple[float, np.ndarray]] = {}

    def score(factors: np.ndarray) -> float:
        key = factors.tobytes()
        if key not in scored:
            scored[key] = (objective(factors), factors)
        return scored[key][0]

    def mutate(parent: np.ndarray) -> np.ndarray:
        hit = rng.random(parent.shape) < config.mutation_rate
        return constrained(parent * np.exp(np.where(hit, rng.normal(0, config.mutation_scale, parent.shape), 0)), s)

    start_losses = {name: score(factors) for name, factors in starts.items()}
    population = list(starts.values())
    while len(population) < config.population:
        population.append(mutate(population[len(population) % len(starts)]))
    history = []
    for _ in range(config.generations):
        ranked = sorted(population, key=score)
        parents = ranked[:config.num_parents]
        children = []
        while len(children) < config.population - len(parents):
            if len(children) % 2 == 0 or len(parents) == 1:
                children.append(mutate(parents[rng.integers(len(parents))]))
            else:
                a, b = rng.choice(len(parents), 2, replace=False)
                children.append(constrained(np.where(rng.random(parents[a].shape) < 0.5, parents[a], parents[b]),
                                            s))
        population = parents + children
        history.append(min(score(candidate) for candidate in population))
    best_loss, best = min(scored.values(), key=lambda item: item[0])
    return SearchResult(long_factor=best, loss=best_loss, starts=start_losses, history=history)
