"""feedback-SFT client update: SPEAR with lambda_lose = 0, the ablation of SPEAR's unlikelihood term (SPEAR.md).

Everything else is SPEAR's round (arXiv 2605.07977): one attempt per prompt, verdicts and non-answer hints,
up to R revisions, wins trained under the original prompt on the sampled token ids, no training without a
win, weight = the prompts trained on (here: those with a win). Only the push away from confident wrong answers is gone, so the comparison
with SPEAR measures what the unlikelihood term adds. Needs no ground truth, like SPEAR.

The wrong first attempts are still collected and capped, so `losses` counts the traces SPEAR would have
pushed down; none of them is trained on (`lose_unlikelihood` stays 0, and they cost no trained tokens).
"""

from __future__ import annotations

import dataclasses

from spearfl.algorithms import spear
from spearfl.algorithms.base import ClientContext, ClientResult, ClientRound


def client_update(context: ClientContext, work: ClientRound) -> ClientResult:
    """One SPEAR round on one client with the unlikelihood weight set to 0; the caller's config is untouched."""
    config = context.config
    without_unlikelihood = config.model_copy(update={"spear": config.spear.model_copy(update={"lambda_lose": 0.0})})
    return spear.client_update(dataclasses.replace(context, config=without_unlikelihood), work)
