"""KV offload tiers under the GPU block pool: pinned CPU memory, then files on local disk.

A full block's identity in every tier is its prefix-cache hash (block_manager.hash_block). A block is written
through to the CPU tier right after the forward that fills it (on the copy stream, overlapping the next steps),
so evicting it from the GPU prefix cache later costs no copy; one not copied down yet is stored when evicted. A
prefix that misses on the GPU is looked up below and loaded back instead of recomputed. Preemption can swap a
sequence's blocks to the CPU tier.

  cpu_tier.py   host slots ([slots, layers, 2, block_size, kv_heads, head_dim]), LRU by hash, swap slots
  disk_tier.py  one file per block (header with fingerprint + checksum), LRU bounded in bytes, warm restart;
                reads on reader threads (one task per thread), writes on hash-sharded writer threads
  read_rate.py  the disk tier's read throughput, estimated from its reads (a restore from disk must pay)
  manager.py    the scheduler's side: decides stores, restores (from disk only when reading beats the step-time
                model's prefill) and swaps, emits transfer ops, counts stats
  transfer.py   the runner's side: executes the ops on a side CUDA stream with events (synchronous on CPU)
  setup.py      builds and attaches the tiers from the engine config
"""
