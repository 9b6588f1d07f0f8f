"""Named sets of params overrides for `dvc exp run`, printed as its -S flags:

    dvc exp run $(tinyllm preset gpu)                       # the 768×8 recipe on one GPU
    dvc exp run $(tinyllm preset gpu) -S model.n_layers=16  # flags after it win

A preset is a flat {dotted param: value} map, so what it changes is visible in one place and in
`dvc exp show` (DVC records each -S value like any other).
"""

from __future__ import annotations

import copy

from tinyllm.config import parse_params
from tinyllm.errors import ConfigError

GPU = {
    # 768×8 at seq 512: 53M parameters, ~1M tokens/s on an H200 (reports/gpu_speed.md)
    "model.dim": 768, "model.n_layers": 8, "model.n_heads": 8, "model.n_kv_heads": 4, "model.hidden_dim": 2048,
    "model.max_seq_len": 512,
    # A world the model does not simply memorise: 4.3M tokens instead of 0.12M. On the default world
    # 768×8 drove the training loss to 0.02 while the validation loss rose from 1.46 to 1.79; on this
    # one both fall together, to 0.43 / 0.46 (H200, 1,600 steps).
    "data.world.n_people": 3000, "data.world.bios_per_person": 24,
    # At the CPU default's 2e-3 pretraining's validation loss sat at a plateau of about 0.70-0.75, and
    # runs left it at different steps, so held-out QA after SFT was anywhere in 7-92% (nine H100
    # runs). At 1e-3 all three runs left it by step 400, kept weights at a validation loss of
    # 0.437-0.444 and stopped early; the one through the pipeline reached 96% (gpu_speed.md).
    "pretrain.lr": 0.001,
    # Post-training steps as big as pretraining's (32 rows × 512): SFT runs at pretraining's speed
    # and reuses its compiled graph; half the steps see the rows the CPU defaults see.
    "pretrain.batch_size": 32, "sft.batch_size": 32, "sft.max_steps": 200, "lora.batch_size": 32,
    "lora.max_steps": 100,
    # DPO's pairs pack into about 27 rows at 192 a step; at 64 (10 rows) the step was too small to
    # fill the GPU (41-52% of pretraining's tokens/s on an H200). Its 20 steps log every 5, so the
    # steady state is 15 steps, not one 10-step window of about 0.1 s.
    "dpo.batch_size": 192, "dpo.max_steps": 20, "dpo.log_interval": 5,
}
PRESETS = {"gpu": GPU}


def with_values(raw: dict, values: dict) -> dict:
    """Nested params `raw` (as params.yaml holds them) with {dotted param: value} put in, as
    `dvc exp run -S` would; `raw` itself is left as it was."""
    nested = copy.deepcopy(raw)
    for dotted, value in values.items():
        *sections, key = dotted.split(".")
        target = nested
        for section in sections:
            target = target.setdefault(section, {})
        target[key] = value
    return nested


def preset_params(name: str) -> dict:
    """The preset as nested params (what params.yaml would hold), checked like params.yaml."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(sorted(PRESETS))})")
    nested = with_values({}, PRESETS[name])
    parse_params(nested, f"preset {name}")
    return nested


def preset_flags(name: str) -> str:
    """`-S key=value` for every param of the preset, for `dvc exp run`."""
    preset_params(name)
    return " ".join(f"-S {key}={value}" for key, value in PRESETS[name].items())
