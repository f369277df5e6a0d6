"""Structured outputs: grammar-constrained decoding with xgrammar (JSON schema, regex, choice, EBNF).

params.py says what a request asks for; grammar.py turns it into an xgrammar grammar (the front end checks
it there, for a 400 naming the problem); compiler.py compiles it against the vocabulary off the step loop;
bitmask.py fills each step's allowed-token masks on the CPU and applies them to the logits.
"""
