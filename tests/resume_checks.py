"""Checks that a data iterator resumes exactly: from its `get_state()` (through JSON, as grain's checkpoint handler
writes it) and through an orbax checkpoint."""

import json

import grain
import numpy as np
import orbax.checkpoint as ocp


def assert_batches_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def assert_resumes_from_state(make, *, skip: int, count: int = 6) -> dict:
    """`make()` builds a fresh iterator. After `skip` batches, a fresh one given the state (JSON round-tripped)
    yields the next `count` batches of the original. Returns the state."""
    original = make()
    for _ in range(skip):
        next(original)
    state = json.loads(json.dumps(original.get_state()))
    expected = [next(original) for _ in range(count)]
    restored = make()
    restored.set_state(state)
    for want in expected:
        assert_batches_equal(next(restored), want)
    return state


def assert_orbax_round_trip(make, directory, *, skip: int, count: int = 4) -> None:
    """The same through `grain.checkpoint.CheckpointSave` / `CheckpointRestore` in an orbax CheckpointManager."""
    original = make()
    for _ in range(skip):
        next(original)
    with ocp.CheckpointManager(directory) as manager:
        manager.save(skip, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(original)))
        manager.wait_until_finished()
        restored = make()
        manager.restore(skip, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(restored)))
    for _ in range(count):
        assert_batches_equal(next(restored), next(original))
