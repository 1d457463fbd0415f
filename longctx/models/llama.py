"""A Llama-style decoder in functional Flax (linen).

Token embedding → N × [RMSNorm → grouped-query attention → residual → RMSNorm → SwiGLU MLP → residual] → RMSNorm →
output head (tied to the embedding or not). Touvron et al., "LLaMA" (2023) and "Llama 2" (2023); GQA from Ainslie et
al. (2023); SwiGLU from Shazeer (2020); RMSNorm from Zhang & Sennrich (2019).

Params are float32 and a plain pytree once unboxed; compute runs in `config.dtype`. Every param and the main
activations carry logical axis names (`batch`, `length`, `embed`, `q_heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`,
`norm`, `layers`), so a mesh and a rules table shard the model without touching it. The model knows no position scheme
and no attention kernel: it calls its `position_scheme` once per forward pass and hands the encoding to every layer,
which attends through `longctx.attention.attention` — or, under a mesh with a sequence axis (the trainer sets
one), through `longctx.parallel.context.attention` by the `context_parallel` strategy on batches in
`sequence_layout` order.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels.flash import attention as flash_attention_lib
from pallas_kernels import masks

from longctx.attention import attention
from longctx.infer import cached_attention
from longctx.infer.kv_cache import CacheView, KVCache
from longctx.parallel import context
from longctx.positions import PositionEncoding, PositionScheme

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# The flash kernels' forward outputs (out and log-sum-exp), saved so the backward does not re-run the forward kernel.
_FLASH_OUTPUTS = jax.checkpoint_policies.save_only_these_names(flash_attention_lib.OUTPUT_NAME,
                                                               flash_attention_lib.STATS_NAME)
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
    "attention": _FLASH_OUTPUTS,
    "dots_attention": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _FLASH_OUTPUTS),
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Sizes and switches of the decoder (hashable, so it can be a static argument)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    dtype: str = "float32"
    init_std: float = 0.02
    scan_layers: bool = False
    remat: str = "none"
    attention_impl: str = "auto"
    mask: masks.Mask = masks.Causal()
    context_parallel: str = "ring"  # longctx.parallel.context's strategy when the mesh splits the sequence ("none":
    # attention as if unsplit, left to XLA; only initialisation uses it)
    sequence_layout: str = "contiguous"  # the token layout of sequence-sharded batches (longctx.parallel.layout)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads ({self.num_kv_heads})"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat must be one of {', '.join(REMAT_POLICIES)}, got {self.remat!r}")

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]


class _Placed(nn.LogicallyPartitioned):
    """Logical axis names without a sharding constraint at initialisation: flax's DenseGeneral initialises kernels
    flattened and checks param shapes by re-running initialisers even in `apply`, which the constraint would refuse
    under a mesh. Params are placed on the mesh by the trainer (`longctx.parallel.mesh.param_shardings`)."""

    def unbox(self, apply_constraint=True):
        return super().unbox(apply_constraint=False)


def _logical(init, axes: tuple[str, ...]):
    return lambda *args, **kwargs: _Placed(init(*args, **kwargs), axes)


def _dense_init(config: LlamaConfig, axes: tuple[str, ...]):
    return _logical(nn.initializers.normal(config.init_std), axes)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · scale, normalised in float32 and cast back before the scale (as HF does)."""

    eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", _logical(nn.initializers.ones, ("norm",)), (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(self.dtype) * scale.astype(self.dtype)


def _splits_sequence() -> bool:
    """Whether the mesh set by `jax.set_mesh` (the trainer's) splits the sequence, so that attention must span it."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and mesh.shape.get("sequence", 1) > 1


class Attention(nn.Module):
    """Grouped-query self-attention: x [B, T, E] → [B, T, E]; num_kv_heads K/V heads are shared by the query heads.
    q/k/v carry biases when `qkv_bias` (Qwen2)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, encoding: PositionEncoding, segment_ids: jax.Array | None,
                 view: CacheView | None = None, kv: tuple[jax.Array, jax.Array] | None = None,
                 layer: jax.Array | int = 0):
        """Without a cache: [B, T, E]. With `view` and every layer's cached (keys, values) `kv`
        (`longctx.infer.KVCache` layout): this layer's (`layer`) new keys and values are written at columns
        view.offset.., the queries attend to every cached column of their row, and the result is (out, kv)."""
        cfg = self.config
        dense = functools.partial(nn.DenseGeneral, use_bias=False, dtype=cfg.compute_dtype, param_dtype=jnp.float32)

        def project(heads: int, heads_axis: str, name: str) -> jax.Array:
            return dense((heads, cfg.head_dim), use_bias=cfg.qkv_bias,
                         kernel_init=_dense_init(cfg, ("embed", heads_axis, "head_dim")),
                         bias_init=_logical(nn.initializers.zeros_init(), (heads_axis, "head_dim")),
                         name=name)(x)

        q = project(cfg.num_heads, "q_heads", "q_proj")
        k = project(cfg.num_kv_heads, "kv_heads", "k_proj")
        v = project(cfg.num_kv_heads, "kv_heads", "v_proj")
        q = nn.with_logical_constraint(q, ("batch", "length", "q_heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))
        v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))
        if kv is not None and view.encoded:
            q, k = encoding.encode(q, k)
            if view.observe:
                self.sow("intermediates", "queries", q[:, -view.observe:])
            kv = tuple(view.write(cache, layer, new) for cache, new in zip(kv, (k, v)))
            out = cached_attention.encoded(q, *kv, view, layer, mask=cfg.mask, segment_ids=segment_ids,
                                           impl=cfg.attention_impl)
        else:
            if kv is not None:
                kv = tuple(view.write(cache, layer, new) for cache, new in zip(kv, (k, v)))
                k, v = (view.contiguous(cache, layer) for cache in kv)

            def attend_fn(q, k, v, *, within: masks.Mask | None = None, **overrides):
                mask = cfg.mask if within is None else cfg.mask & within
                if kv is not None:
                    return cached_attention.over_cache(q, k, v, view, mask=mask, segment_ids=segment_ids,
                                                       impl=cfg.attention_impl, **overrides)
                if cfg.context_parallel != "none" and _splits_sequence():
                    return context.attention(q, k, v, strategy=cfg.context_parallel, layout=cfg.sequence_layout,
                                             mask=mask, segment_ids=segment_ids, impl=cfg.attention_impl, **overrides)
                return attention(q, k, v, mask=mask, segment_ids=segment_ids, impl=cfg.attention_impl, **overrides)

            out = encoding.attend(q, k, v, attend_fn)
        out = nn.with_logical_constraint(out, ("batch", "length", "q_heads", "head_dim"))
        out = dense(cfg.hidden_size, axis=(-2, -1), kernel_init=_dense_init(cfg, ("q_heads", "head_dim", "embed")),
                    name="o_proj")(out)
        return out if kv is None else (out, kv)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) · up(x)): x [B, T, E] → [B, T, E] through a hidden width of intermediate_size."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dense = functools.partial(nn.Dense, use_bias=False, dtype=cfg.compute_dtype, param_dtype=jnp.float32)
        gate = dense(cfg.intermediate_size, kernel_init=_dense_init(cfg, ("embed", "mlp")), name="gate_proj")(x)
        up = dense(cfg.intermediate_size, kernel_init=_dense_init(cfg, ("embed", "mlp")), name="up_proj")(x)
        hidden = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
        return dense(cfg.hidden_size, kernel_init=_dense_init(cfg, ("mlp", "embed")), name="down_proj")(hidden)


class DecoderLayer(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + mlp(norm(h)). It takes and returns the carry (x, kv) of a
    scan over layers, kv being every layer's cached (keys, values) or None, and the layer's index (scanned): under
    `nn.scan` the cache travels in the carry, so each layer writes its new columns into it in place."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, carry: tuple[jax.Array, tuple[jax.Array, jax.Array] | None], encoding: PositionEncoding,
                 segment_ids: jax.Array | None, view: CacheView | None, layer: jax.Array | int):
        cfg = self.config
        x, kv = carry
        norm = functools.partial(RMSNorm, cfg.rms_norm_eps, cfg.compute_dtype)
        attended = Attention(cfg, name="attn")(norm(name="attn_norm")(x), encoding, segment_ids, view, kv, layer)
        if kv is not None:
            attended, kv = attended
        h = x + attended
        out = h + SwiGLU(cfg, name="mlp")(norm(name="mlp_norm")(h))
        out = nn.with_logical_constraint(out, ("batch", "length", "embed"))
        return (out, kv), None


class Llama(nn.Module):
    """The decoder: tokens [B, T] int32 → logits [B, T, vocab_size] float32.

    positions [B, T] int32 default to 0..T-1; segment_ids [B, T] int32 (0 = padding) mask attention across packed
    documents and are None for unpacked input. `train` is True in training steps (a scheme may sample then, from the
    "positions" rng: CLEX).

    With `cache` (a `longctx.infer.KVCache`) the tokens are the next T columns of the cached sequences (segment_ids
    must be None: a row's padding is the columns before its start): their keys and values are written into the
    cache, they attend to every cached column of their row (query row t sits at column cache.length + t, so masks
    and ALiBi count distance in columns), and the result is (logits, updated cache). A cache of raw keys gives the
    position scheme the query positions and all cached positions (dynamic NTK and CLEX follow the grown length;
    LM-Infinite and Self-Extend apply their rules to cached keys), so every scheme decodes exactly as the
    full-sequence forward computes; a cache of encoded keys (schemes that `encodes_keys_once`) is attended by the
    decoding kernel (`longctx.infer.cached_attention`). `last_logits_only` returns logits of the last column only
    ([B, 1, vocab]), which is all that a prefill needs. `hidden_only` returns the final-normed hidden states
    [B, T, hidden] (compute dtype) instead of logits, for a loss that applies the output head itself
    (`output_weights`; `longctx.train.loss.chunked_weighted_loss`). `observe` > 0 (encoded keys) sows each layer's
    encoded queries of the last `observe` tokens into the "intermediates" collection under `queries` (apply with
    mutable="intermediates"): SnapKV's observation window (`longctx.infer.compress`).
    """

    config: LlamaConfig
    position_scheme: PositionScheme

    def __post_init__(self):
        super().__post_init__()
        self.position_scheme.check_mask(self.config.mask)

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, *, train: bool = False, cache: KVCache | None = None,
                 last_logits_only: bool = False, hidden_only: bool = False, observe: int = 0):
        cfg = self.config
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                         embedding_init=_dense_init(cfg, ("vocab", "embed")), name="embed")
        x = nn.with_logical_constraint(embed(tokens), ("batch", "length", "embed"))
        view, kv = None, None
        if cache is None:
            encoding = self.position_scheme(positions, train=train)
        else:
            if train:
                raise ValueError("a KV cache is for inference; train must be False")
            if segment_ids is not None:
                raise ValueError("with a KV cache, padding is the cache's `starts` (KVCache.empty(starts=...)); "
                                 "segment_ids must be None")
            if cache.encoded and not self.position_scheme.encodes_keys_once():
                raise ValueError(f"position scheme {type(self.position_scheme).__name__} re-encodes cached keys at "
                                 f"every step (its tables follow the length, or it attends in its own way); it "
                                 f"needs a cache of raw keys (KVCache encoded=False)")
            if observe and not (cache.encoded and 0 < observe <= tokens.shape[1]):
                raise ValueError(f"observe={observe} sows encoded queries of the last new tokens: it needs a cache of "
                                 f"encoded keys and at most the {tokens.shape[1]} new tokens")
            view = cache.view(tokens.shape[1], observe)
            segment_ids = view.new_segment_ids(tokens.shape[1])
            cache = cache.with_tokens(positions)
            encoding = self.position_scheme(positions) if cache.encoded else self.position_scheme(positions,
                                                                                                  cache.positions)
            kv = (cache.keys, cache.values)

        layer = DecoderLayer
        if cfg.remat != "none":
            layer = nn.remat(layer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            layers = nn.scan(layer, variable_axes={"params": 0, "intermediates": 0}, split_rngs={"params": True},
                             in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0), length=cfg.num_layers,
                             metadata_params={nn.PARTITION_NAME: "layers"})
            (x, kv), _ = layers(cfg, name="layers")((x, kv), encoding, segment_ids, view,
                                                    jnp.arange(cfg.num_layers, dtype=jnp.int32))
        else:
            for i in range(cfg.num_layers):
                (x, kv), _ = layer(cfg, name=f"layers_{i}")((x, kv), encoding, segment_ids, view, i)

        if last_logits_only:
            x = x[:, -1:]
        x = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, name="final_norm")(x)
        if hidden_only:
            if cache is not None:
                raise ValueError("hidden_only is for training losses; it takes no KV cache")
            return x
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                              kernel_init=_dense_init(cfg, ("embed", "vocab")), name="lm_head")(x)
        logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))
        if cache is None:
            return logits
        return logits, cache.replace(keys=kv[0], values=kv[1])


def output_weights(params, config: LlamaConfig) -> jax.Array:
    """The output head's float32 matrix [hidden, vocab] in `params`: lm_head's kernel, or the embedding transposed
    when tied (logits = hidden · W, as `Llama` computes them)."""
    return params["embed"]["embedding"].T if config.tie_embeddings else params["lm_head"]["kernel"]


def _initialising(model: Llama) -> Llama:
    """The model as initialisation traces it: reference attention, never split over a mesh. Params do not depend on
    the implementation, and no kernel or layout need fit the short dummy sequence (`check_forward` checks the real
    shapes)."""
    return model.clone(config=dataclasses.replace(model.config, attention_impl="reference", context_parallel="none"))


def init_params(model: Llama, rng: jax.Array, seq_len: int = 8):
    """(params, logical_axes): the float32 params as a plain pytree, and the same tree of logical PartitionSpecs."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    boxed = jax.jit(_initialising(model).init)(rng, tokens)["params"]
    return nn.meta.unbox(boxed), nn.get_partition_spec(boxed)


def unscanned(model: Llama, params) -> tuple[Llama, dict]:
    """(model, params) with the layers unrolled: a scanned model's stacked params [num_layers, ...] split into
    layers_0 .. layers_{L-1}, and the model with scan_layers False (unchanged when it is not scanned). Same function.

    For decoding: a step reads every weight once, and a scanned step slices each layer's weights out of the stack,
    which XLA copies before the matmuls read them (three passes over the weights instead of one; measured on an H100,
    docs/benchmarks.md). MaxText likewise decodes from unscanned checkpoints. Costs one copy of the params."""
    if not model.config.scan_layers:
        return model, params
    stacked = params["layers"]
    layers = {f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(model.config.num_layers)}
    rest = {key: value for key, value in params.items() if key != "layers"}
    return model.clone(config=dataclasses.replace(model.config, scan_layers=False)), {**rest, **layers}


def scanned(model: Llama, params) -> tuple[Llama, dict]:
    """The inverse of `unscanned`: (model, params) with layers_0 .. layers_{L-1} stacked into params["layers"]
    [num_layers, ...] and the model with scan_layers True (unchanged when it already is). Same function; XLA compiles
    one layer body instead of L, about a third of the compilation time of a 30-layer model (SmolLM2-135M on a CPU:
    4 s against 13 s for a prefill chunk and a decoding loop), for programs compiled more often than they run long
    (evaluation). Costs one copy of the params."""
    if model.config.scan_layers:
        return model, params
    layers = [params[f"layers_{i}"] for i in range(model.config.num_layers)]
    rest = {key: value for key, value in params.items() if not key.startswith("layers_")}
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return model.clone(config=dataclasses.replace(model.config, scan_layers=True)), {**rest, "layers": stacked}


def param_structure(model: Llama):
    """(abstract params, logical_axes) without computing anything: ShapeDtypeStructs (shape and dtype only, whatever
    mesh is current: a caller's own jax.set_mesh does not follow them into the trainer's) and logical
    PartitionSpecs."""
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    boxed = jax.eval_shape(_initialising(model).init, jax.random.key(0), tokens)["params"]
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.meta.unbox(boxed))
    return shapes, nn.get_partition_spec(boxed)


def check_forward(model: Llama, batch_size: int, seq_len: int, *, packed: bool, abstract_params=None) -> None:
    """Traces `model` abstractly (no compute) on a [batch_size, seq_len] batch, with segment ids when `packed`, so that
    an attention request no implementation can honour on this platform raises ValueError (naming
    `model.attention.impl`) before any work is done. Under a mesh (`jax.set_mesh`) it traces the sharded forward,
    given `abstract_params` (`param_structure`, computed outside the mesh)."""
    tokens = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
    params = param_structure(model)[0] if abstract_params is None else abstract_params
    try:
        jax.eval_shape(lambda p, t, s: model.apply({"params": p}, t, t, s), params, tokens, tokens if packed else None)
    except NotImplementedError as e:
        raise ValueError(f"model.attention.impl={model.config.attention_impl!r}: {e}") from None
