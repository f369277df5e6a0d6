"""The multi-turn chat workload of issue 26: conversations whose re-sent histories outgrow the GPU KV pool.

Each conversation opens with its own history of `first_len` token ids (a system prompt plus earlier context),
then runs `turns` turns: turn t's prompt is the whole conversation so far, as a chat client re-sends it (turn 0:
the opening history; turn t > 0: turn t-1's prompt + the ids the server returned as its answer + `user_len` new
user ids). Each answer is `answer_len` tokens (max_tokens, ignore EOS, greedy), so the sizes are fixed while the
answer ids are the model's own. Between a conversation's turns the client "thinks" (from the answer's end to the
next turn's send). Conversations start at Poisson times and interleave, so while one thinks the others push its
prefix out of a small GPU pool.

Draws, fixed (`random.seed(seed)`, default 26), in this order: for each conversation its opening ids
`randint(3, max_token_id)` x first_len, then its turns-1 user messages of user_len ids each; then for each
conversation its start gap `expovariate(start_rate)` (cumulative); then for each conversation its turns-1
think times `expovariate(1 / think_mean_s)`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Conversation:
    """One conversation's drawn inputs; the answers come from the server at run time."""

    opening: list[int]  # turn 0's prompt
    user_turns: list[list[int]]  # what the user adds at turns 1 .. turns-1
    think_s: list[float]  # the pause before turns 1 .. turns-1 (after the previous answer ended)
    start_at: float  # seconds after the run's start of turn 0
    answer_len: int

    @property
    def turns(self) -> int:
        return 1 + len(self.user_turns)

    def next_prompt(self, prompt: list[int], answer: list[int], turn: int) -> list[int]:
        """Turn `turn`'s prompt (turn >= 1): the previous prompt, its answer and the user's new ids."""
        return prompt + answer + self.user_turns[turn - 1]

    @property
    def final_prompt_len(self) -> int:
        """Tokens of the last turn's prompt (every answer is answer_len tokens)."""
        return len(self.opening) + sum(len(u) + self.answer_len for u in self.user_turns)


@dataclass
class MultiTurnSpec:
    """The workload's sizes; the defaults are the device run's (Llama-3.1-8B arch against a 4 GiB GPU pool of
    32K tokens: 48 histories of up to 3,072 tokens, 147K in all)."""

    conversations: int = 48
    turns: int = 6
    first_len: int = 2048
    user_len: int = 128
    answer_len: int = 64
    think_mean_s: float = 3.0
    start_rate: float = 4.0  # conversations started per second (Poisson)
    max_token_id: int = 10000
    seed: int = 26

    @property
    def max_model_len(self) -> int:
        """The longest sequence a turn makes: the final prompt plus its answer."""
        return self.first_len + (self.turns - 1) * (self.user_len + self.answer_len) + self.answer_len

    def live_prefix_tokens(self) -> int:
        """Tokens of every conversation's history at its end: what a cache would hold to miss nothing."""
        return self.conversations * self.max_model_len


def multiturn_conversations(spec: MultiTurnSpec) -> list[Conversation]:
    """Draw the conversations of `spec` in the documented order."""
    if spec.conversations < 1 or spec.turns < 1 or spec.first_len < 1 or spec.answer_len < 1:
        raise ValueError("conversations, turns, first_len and answer_len must be >= 1")
    if spec.user_len < 0 or spec.think_mean_s < 0 or spec.start_rate <= 0:
        raise ValueError("user_len and think_mean_s must be >= 0 and start_rate > 0")
    random.seed(spec.seed)

    def ids(n: int) -> list[int]:
        return [random.randint(3, spec.max_token_id) for _ in range(n)]

    texts = [(ids(spec.first_len), [ids(spec.user_len) for _ in range(spec.turns - 1)])
             for _ in range(spec.conversations)]
    starts, t = [], 0.0
    for _ in range(spec.conversations):
        t += random.expovariate(spec.start_rate)
        starts.append(t)
    thinks = [[random.expovariate(1.0 / spec.think_mean_s) if spec.think_mean_s else 0.0
               for _ in range(spec.turns - 1)] for _ in range(spec.conversations)]
    return [Conversation(opening, users, think, start, spec.answer_len)
            for (opening, users), think, start in zip(texts, thinks, starts)]
