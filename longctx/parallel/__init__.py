"""Parallelism: the device mesh and its sharding rules (`mesh`), token layouts (`layout`) and context-parallel
attention by ring, all-gather or Ulysses (`context`)."""
