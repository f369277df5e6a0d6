"""Structured outputs: grammar-constrained decoding with xgrammar (JSON schema, regex, choice, EBNF).

params.py says what a request asks for; grammar.py turns it into an xgrammar grammar (the front end checks
it there, for a 400 naming the problem); compiler.py compiles it against the vocabulary off the step loop;
bitmask_filler.py fills each step's allowed-token masks on the CPU in one batched call, bitmask.py applies
them to the logits (and holds the plain per-row references).
"""
