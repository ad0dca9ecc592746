"""Personalization: each client's own adapter beside the global one, by `personal.method` (one file a method).

none: the global adapter for everyone. local: each client alone, no federation. finetune: FedAvg, then local
fine-tuning. ditto: a proximal personal adapter beside the global one. fedper: the top layers' LoRA modules stay
on the client. tap: TAP's replacement per module on the client's validation split, then distillation from the
global adapter. What they share is in `spearfl.personal.base`.
"""

from spearfl.personal.base import PersonalClient, PersonalMethod
from spearfl.personal.ditto import Ditto
from spearfl.personal.fedper import FedPer
from spearfl.personal.finetune import FineTune
from spearfl.personal.local import LocalOnly
from spearfl.personal.none import NoPersonalization
from spearfl.personal.tap import Tap

METHODS: dict[str, type[PersonalMethod]] = {
    "none": NoPersonalization,
    "local": LocalOnly,
    "finetune": FineTune,
    "ditto": Ditto,
    "fedper": FedPer,
    "tap": Tap,
}

__all__ = ["METHODS", "PersonalClient", "PersonalMethod"]
