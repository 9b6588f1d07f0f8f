"""Which corpus formats each kind of data may be in. A leaf module (no imports), so validating
params (`tinyllm/config.py`) can name the formats without importing the readers, and with them torch."""

KIND_FORMATS = {
    "pretrain": ("text",),
    "sft": ("minimind_sft", "sharegpt", "alpaca", "deepctrl"),
    "identity": ("minimind_sft", "sharegpt", "alpaca", "deepctrl"),
    "dpo": ("minimind_dpo",),
    "grpo": ("verifiable", "gsm8k"),
}
"""The formats each kind of corpus (data.pretrain, data.sft, data.identity, data.dpo, data.grpo) may be in
(tinyllm/data/formats.py describes and converts them)."""
FORMATS = tuple(dict.fromkeys(f for formats in KIND_FORMATS.values() for f in formats))
