"""A device's personal adapter (spearfl.personal), kept beside its interaction store.

`<store>.personal.safetensors` (mode 0600) holds the adapter and, in its metadata, what made it: the method, the
round that last trained it, the global adapter version it was trained from, and the method's notes (TAP: the
modules it replaced). The file is written atomically once a round or the training after federation has trained
the adapter, before the round's reply leaves, so a device killed at any moment restarts with exactly the adapter
its last finished round left. A reset (from the page) removes it: the device answers with the global adapter
until the next round trains a personal one again, from the global adapter as it then stands.

The device's people are answered by the personal adapter where there is one, else by the global adapter; the
personal adapter never leaves the device (only `PersonalMethod.shared` of the global update does).

Validation (TAP's stage 1) on a device: a fixed share of the interactions, chosen by their id
(`personal.validation_fraction`), is never trained on; the answers its people judged right among those are the
device's validation split.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import torch
from safetensors import safe_open

from spearfl.data.store import Interaction
from spearfl.errors import UserError
from spearfl.io import load_tensors, save_tensors
from spearfl.personal.base import JudgedAnswer

VALIDATION_LIMIT = 64  # the newest right answers held out for validation that a round measures on
INFO_KEY = "spearfl.personal"


def personal_path(store_path: str | Path) -> Path:
    return Path(store_path).with_suffix(".personal.safetensors")


def held_for_validation(interaction_id: str, fraction: float) -> bool:
    """Whether an interaction belongs to the device's validation split: a fixed share, by a hash of its id."""
    digest = hashlib.sha256(interaction_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def right_answer(interaction: Interaction) -> JudgedAnswer | None:
    """The interaction's answer judged right, under its first prompt (a revision's answer to the question as
    first asked, as SPEAR trains it), or None; a revision whose hint gave the answer away does not count."""
    first = interaction.first
    if first.verdict:
        return JudgedAnswer(first.prompt_ids, first.token_ids, True)
    attempts = interaction.attempts
    for number in range(1, len(attempts)):
        if attempts[number].verdict and not attempts[number - 1].hint_gave_answer:
            return JudgedAnswer(first.prompt_ids, attempts[number].token_ids, True)
    return None


def first_answer(interaction: Interaction) -> JudgedAnswer | None:
    """The first answer as judged, or None while it is not judged."""
    first = interaction.first
    return None if first.verdict is None else JudgedAnswer(first.prompt_ids, first.token_ids, bool(first.verdict))


class DevicePersonal:
    """The device's personal adapter and what made it; None in `state` while it has none."""

    def __init__(self, path: str | Path | None, method: str):
        """`path` None: kept in memory only (a test, a demo)."""
        self.path, self.method, self.lock = None if path is None else Path(path), method, threading.Lock()
        self.state: dict[str, torch.Tensor] | None = None
        self.info: dict = {}
        if self.path is not None and self.path.exists():
            try:
                self.state = load_tensors(self.path)
                with safe_open(str(self.path), "pt") as handle:
                    self.info = json.loads((handle.metadata() or {}).get(INFO_KEY, "{}"))
            except (OSError, ValueError) as error:
                raise UserError(f"{self.path}: not a personal adapter ({error}); move it away to start afresh") from None

    def update(self, state: dict[str, torch.Tensor], **info) -> None:
        """Keep `state` as the personal adapter, on disk before it answers anyone."""
        with self.lock:
            record = {"method": self.method, "updated_at": time.time(), **info}
            if self.path is not None:
                save_tensors(self.path, state, metadata={INFO_KEY: json.dumps(record, sort_keys=True)})
            self.state, self.info = {name: tensor.detach().clone() for name, tensor in state.items()}, record

    def reset(self) -> None:
        """Drop the personal adapter: the device answers with the global one."""
        with self.lock:
            if self.path is not None:
                self.path.unlink(missing_ok=True)
            self.state, self.info = None, {"method": self.method, "reset_at": time.time()}

    def answering(self, global_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The adapter that answers people: the personal one, else the global one."""
        return global_state if self.state is None else self.state

    def view(self, global_version: int) -> dict:
        """What the page shows: which adapter answers, the global version, and the personal adapter's record."""
        with self.lock:
            personal = None if self.state is None else {key: value for key, value in self.info.items() if key != "method"}
            return {
                "method": self.method,
                "answering": "global" if self.state is None else "personal",
                "global_version": global_version,
                "personal": personal,
                "reset_at": self.info.get("reset_at") if self.state is None else None,
            }
