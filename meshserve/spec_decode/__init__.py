"""Speculative decoding: proposers guess the next k tokens, one target forward scores all k + 1 positions,
and verification keeps the longest prefix the target agrees with (greedy) or that rejection sampling accepts
(temperature > 0), plus one token of the target's own.

  config.py             SpeculativeConfig (vLLM's --speculative-config keys) and its validation
  ngram_proposer.py     prompt lookup: the continuation of the latest earlier match of the sequence's suffix
  draft_model.py        a smaller model with its own paged KV, proposing k tokens autoregressively
  eagle3.py             an EAGLE-3 head (public checkpoint layout) over the target's hidden states at 3 layers
  eagle3_random_head.py a random head in that layout, for tests and GPU runs (there is no trained one here)
  drafters.py           which on-rank proposer a config asks for (draft model or EAGLE-3) and its start-up checks
  replay_proposer.py    controlled acceptance (the target's own continuation with errors), for benchmarks
  speculator.py         the engine core's side: who gets proposals, the n-gram proposer, the counters
  rejection_sampler.py  verification: greedy prefix match and rejection sampling
  stats.py              acceptance counters (vLLM's spec_decode metrics)
"""
