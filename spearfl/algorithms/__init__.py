"""Client updates by name. Runtimes look an algorithm up here and never branch on its name."""

from spearfl.algorithms import spear
from spearfl.algorithms import feedback_sft
from spearfl.algorithms import opsd
from spearfl.algorithms import grpo
from spearfl.algorithms import rltf_sd

ALGORITHMS = {
    "spear": spear.client_update,
    "feedback_sft": feedback_sft.client_update,
    "opsd": opsd.client_update,
    "grpo": grpo.client_update,
    "rltf_sd": rltf_sd.client_update,
}
