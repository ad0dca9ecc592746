"""Client updates by name. Runtimes look an algorithm up here and never branch on its name."""

from spearfl.algorithms import feedback_sft, grpo, opsd, rltf_sd, spear
from spearfl.algorithms.base import ClientUpdate

ALGORITHMS: dict[str, ClientUpdate] = {
    "spear": spear.client_update,
    "feedback_sft": feedback_sft.client_update,
    "opsd": opsd.client_update,
    "grpo": grpo.client_update,
    "rltf_sd": rltf_sd.client_update,
}

# The config section each algorithm reads its settings, and any budget of its own, from.
CONFIG_SECTIONS = {"spear": "spear", "feedback_sft": "spear", "opsd": "opsd", "grpo": "grpo", "rltf_sd": "rltf_sd"}
