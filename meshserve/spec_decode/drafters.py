"""The proposers that run on the ranks after each target step: which one a config asks for, and its start-up
checks. draft_model: a smaller model of the same vocabulary; eagle3: a head over the target's hidden states."""

from __future__ import annotations

import torch
from torch import nn

from meshserve.config import EngineConfig
from meshserve.spec_decode.config import SpeculativeConfig


def check_drafter(
    spec: SpeculativeConfig, target_hf_config, max_model_len: int, tp: int = 1, pp: int = 1,
    target_tokenizer: str | None = None,
) -> None:
    """Refuse, in one line, a draft checkpoint that cannot draft for the target."""
    if spec.method == "eagle3":
        from meshserve.spec_decode.eagle3 import check_eagle3_head

        check_eagle3_head(spec, target_hf_config, tp, pp)
    else:
        from meshserve.spec_decode.draft_model import check_draft_model

        check_draft_model(spec, target_hf_config, max_model_len, tp, target_tokenizer)


def build_drafter(config: EngineConfig, device: torch.device, target: nn.Module):
    """This rank's proposer for the config (None: proposals come from the host, or there are none)."""
    spec = config.speculative_config
    if spec is None or not spec.uses_draft_model:
        return None
    if spec.method == "eagle3":
        from meshserve.spec_decode.eagle3 import Eagle3Proposer

        return Eagle3Proposer(config, device, target)
    from meshserve.spec_decode.draft_model import DraftModelProposer

    return DraftModelProposer(config, device)
