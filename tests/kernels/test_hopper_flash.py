"""The Pallas Mosaic GPU (Hopper) backend: the shared suite in Mosaic GPU interpret mode on CPU, in bfloat16 (the
kernels take bfloat16 / float16 only), and compiled on a GPU of compute capability 9.0 or more when one is present.

Interpret mode cannot hold a wgmma operand or a pre-initialised accumulator in registers, so there the kernels stage
those through shared memory (`hopper_flash._mma`); `test_compiled_kernels_lower_for_hopper` lowers the compiled
variant through Mosaic GPU on any machine, which checks it type-checks, lays out and fits in shared memory.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from flash_test_base import FlashAttentionTests, _inputs
from gpus import hopper_present
from pallas_kernels import BlockSizes, flash_attention, masks
from pallas_kernels.gpu import hopper_flash

ONE_WARPGROUP = BlockSizes(64, 64, 64, 64, 64, 64)  # one compute warpgroup in every kernel


class HopperTests(FlashAttentionTests):
    backend = "mosaic_gpu"
    dtype = jnp.bfloat16
    block = 64  # the smallest block a compute warpgroup takes: sequences of 256, two 128-blocks at the defaults
    block_sizes = None  # the backend's defaults: two compute warpgroups wherever the lengths allow
    low_precision_dtypes = (jnp.bfloat16, jnp.float16)
    supports_softplus = False

    def attend(self, q, k, v, **kwargs):
        if isinstance(kwargs.get("mask"), masks.BlockMask):  # the suite's block mask has 64x64 blocks
            kwargs.setdefault("block_sizes", ONE_WARPGROUP)
        return super().attend(q, k, v, **kwargs)

    def test_one_compute_warpgroup(self):
        self.check(*self.inputs(B=2), mask=self.masks["sinks_window"], segment_ids=self.segments(),
                   block_sizes=ONE_WARPGROUP)

    def test_refusals_name_the_combination(self):
        q, k, v = _inputs(dtype=self.dtype)
        with pytest.raises(NotImplementedError, match="softmax only; backend='triton' runs softplus"):
            self.attend(q, k, v, normalizer="softplus")
        with pytest.raises(NotImplementedError, match="bfloat16 or float16 inputs.*got float32"):
            self.attend(*_inputs(), mask=masks.Causal())
        with pytest.raises(NotImplementedError, match="head dims"):
            self.attend(*_inputs(D=96, dtype=self.dtype))
        with pytest.raises(NotImplementedError, match="block_q must be 64 or 128"):
            self.attend(q, k, v, block_sizes=BlockSizes(block_q=256))
        with pytest.raises(NotImplementedError, match="block_kv must be a multiple of 64"):
            self.attend(q, k, v, block_sizes=BlockSizes(block_kv=32))
        q, k, v = _inputs(D=256, dtype=self.dtype)
        with pytest.raises(NotImplementedError, match="shared memory"):
            self.attend(q, k, v, block_sizes=BlockSizes(block_kv=256))


class TestHopperInterpret(HopperTests):
    """Interpret mode simulates every warpgroup, barrier, copy and wgmma on the CPU (about a millisecond each), so it
    runs the masks whose kernel paths differ — no partial blocks (the block mask, in test_empty_blocks_are_never_read),
    causal, per-head (S2), a union (sinks + window), sliding window — and float16 besides bfloat16; full, chunked-local
    and distant run compiled only."""

    interpret = True

    @pytest.mark.parametrize("mask_name", ["causal", "s2_strided_heads", "sinks_window", "sliding_window"])
    def test_mask_forward_lse_and_gradients(self, mask_name):  # and the block mask in test_empty_blocks_are_never_read
        super().test_mask_forward_lse_and_gradients(mask_name)

    @pytest.mark.parametrize("mask_name", ["causal"])  # sliding_window: in test_no_races, under the race detector
    def test_packed_documents_and_padding(self, mask_name):
        super().test_packed_documents_and_padding(mask_name)

    @pytest.mark.parametrize("dtype", [jnp.float16])  # bfloat16 is every other test's dtype
    def test_low_precision(self, dtype):
        super().test_low_precision(dtype)

    def test_blocks_of_one_document_skip_the_segment_mask(self):
        """Long documents: full blocks whose queries and keys share one document run without the segment mask, the
        others with it (both kinds are present here, and in the dQ and dK/dV layouts alike): below the diagonal of
        128-blocks, block (1, 0) lies in one document in the second row and spans two in the first."""
        q, k, v = self.inputs(B=2)
        segment_ids = jnp.asarray([[1] * 200 + [2] * 56, [1] * 256], jnp.int32)
        meet, same = hopper_flash._segment_blocks(segment_ids, segment_ids, 128, 128)
        below_diagonal = np.tril(np.ones((2, 2), bool), -1)
        assert np.any(np.asarray(same) & below_diagonal) and np.any(np.asarray(meet & ~same) & below_diagonal)
        self.check(q, k, v, mask=masks.Causal(), segment_ids=segment_ids)

    def test_no_races(self, monkeypatch):
        """The interpreter's race detector over every kernel, two compute warpgroups, segment ids and a partial
        mask: each TMA, wgmma and shared-memory access is ordered by the barriers. The run is the shared suite's
        packed documents with a sliding window, checked against the oracle as there. A kernel's race state is read
        once its outputs exist, by a callback on them: the kernels run under jit, where `_run` only traces them."""
        from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call  # the detector has no public API
        run, found = hopper_flash._run, []

        def checked(*args, **kwargs):
            outputs = run(*args, **kwargs)
            jax.debug.callback(lambda *_: found.append((args[1], interpret_pallas_call.get_races().races_found)),
                               outputs)
            return outputs
        monkeypatch.setattr(hopper_flash, "_run", checked)
        with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=True)):
            super().test_packed_documents_and_padding("sliding_window")
        jax.effects_barrier()
        assert sorted({name for name, _ in found}) == ["flash_backward_dkdv", "flash_backward_dq", "flash_forward"]
        assert not [name for name, races in found if races], f"races in {[name for name, races in found if races]}"


@pytest.mark.skipif(not hopper_present(), reason="needs a GPU of compute capability 9.0 or more")
class TestHopperGPU(HopperTests):
    interpret = False


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_compiled_kernels_lower_for_hopper(head_dim):
    """The compiled kernels (wgmma from registers, accumulators in run_state) lowered through Mosaic GPU for
    CUDA at the default block sizes: forward and backward, segment ids, a per-head mask. Two of the largest default
    blocks (128) a side: longer sequences lower the same kernels over a longer grid."""
    q = jax.ShapeDtypeStruct((1, 256, 4, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 256, 2, head_dim), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((1, 256), jnp.int32)

    def loss(q, k, v, ids):
        out = flash_attention(q, k, v, mask=masks.StridedHeads(block=64, local_blocks=2, stride=2),
                              segment_ids=ids, backend="mosaic_gpu")
        return jnp.sum(out.astype(jnp.float32))
    lowered = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, kv, kv, ids).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("mosaic_gpu") >= 3, "expected the forward, dQ and dK/dV kernels"


def test_visit_lists_order_full_then_partial_and_filter_by_segments():
    kinds = np.array([[[[0, 2, 1, 2], [1, 0, 0, 0]], [[2, 0, 0, 1], [0, 0, 0, 0]]]], np.int8)  # [1, G=2, R=2, C=4]
    visits, bounds = hopper_flash._visit_lists(kinds)
    assert visits.shape == (1, 1, 2, 5)
    np.testing.assert_array_equal(visits[0, 0, 0], [1, 3, 2, 4, 7])  # run 0: full 1, 3; partial 2; run 1: 4 | 7
    np.testing.assert_array_equal(bounds[0, 0, 0], [0, 2, 2, 3, 4, 4, 5])  # no segment ids: no masked full blocks
    np.testing.assert_array_equal(visits[0, 0, 1, :1], [0])
    np.testing.assert_array_equal(bounds[0, 0, 1], [0, 0, 0, 1, 1, 1, 1])
    meet = jnp.array([[[True, False, True, True], [True, True, True, True]]])  # [B=1, R, C]
    same = jnp.zeros_like(meet)
    visits, bounds = hopper_flash._visit_lists(kinds, meet, same)
    np.testing.assert_array_equal(np.asarray(visits)[0, 0, 0, :4], [3, 2, 4, 7])
    np.testing.assert_array_equal(np.asarray(bounds)[0, 0, 0], [0, 0, 1, 2, 2, 3, 4])


def test_visit_lists_put_full_blocks_of_one_document_first():
    """Row 0's full blocks 1 and 3: block 3 holds one document on both sides, so it needs no segment mask and comes
    first; block 1 is masked; the partial block 2 last."""
    kinds = np.array([[[[0, 2, 1, 2]]]], np.int8)  # [1, G=1, R=1, C=4]
    meet = jnp.array([[[True, True, True, True]]])
    same = jnp.array([[[False, False, True, True]]])  # a partial block is masked whatever its segments
    visits, bounds = hopper_flash._visit_lists(kinds, meet, same)
    np.testing.assert_array_equal(np.asarray(visits)[0, 0, 0], [3, 1, 2])
    np.testing.assert_array_equal(np.asarray(bounds)[0, 0, 0], [0, 1, 2, 3])


def test_segment_blocks_find_blocks_of_one_shared_document():
    q_ids = jnp.array([[1, 1, 1, 2, 0, 0]])  # blocks of 2 queries: {1}, {1, 2}, {0}
    kv_ids = jnp.array([[1, 1, 2, 2, 0, 0]])  # blocks of 2 keys: {1}, {2}, {0}
    meet, same = hopper_flash._segment_blocks(q_ids, kv_ids, 2, 2)
    np.testing.assert_array_equal(np.asarray(same)[0], [[True, False, False], [False, False, False],
                                                         [False, False, False]])
    np.testing.assert_array_equal(np.asarray(meet)[0, 1], [True, True, False])