"""The spearfl config of a Flower run: the YAML named by the run config's `config`, with its `set` overrides.

  config  spearfl YAML config; a relative path is taken from the app folder (where pyproject.toml is)
  set     spearfl overrides, as `spearfl run --set` takes them, separated by spaces

The ServerApp runs it; in a simulation the ClientApp takes it as every simulated device's own config (in a
deployment a device names its own, node config `device-config`). Imports neither torch nor the model code.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from spearfl.config import RunConfig, load_config

APP_FOLDER = Path(__file__).resolve().parents[2]


def configured(run_config: dict) -> RunConfig:
    """The config named by `config` (relative to the app folder) with the `set` overrides, validated."""
    name = str(run_config.get("config", ""))
    path = None if not name else Path(name) if Path(name).is_absolute() else APP_FOLDER / name
    return load_config(path, shlex.split(str(run_config.get("set", ""))))


def device_settings(node_config: dict, run_config: dict) -> dict:
    """A device's own settings as the ClientHost takes them: its config (node config `device-config`, a YAML path on
    the device; without one, as in a simulation, the run's) and its examples file (node config `examples`)."""
    own = load_config(str(node_config["device-config"])) if "device-config" in node_config else configured(run_config)
    examples = node_config.get("examples")
    return {"config": own.model_dump(mode="json"), "examples_path": None if examples is None else str(examples)}
