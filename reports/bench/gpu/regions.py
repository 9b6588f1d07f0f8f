"""Nested compile regions for the benches that weigh them. The training engine does not use them:
on one H100 they made LoRA's step faster (33.0 ms against 42.2) and full fine-tuning's and DPO's
4-7% slower, and they need a workaround for torch 2.13 (reports/gpu_speed.md, "The engine as
committed, a same-host A/B")."""

from __future__ import annotations

import argparse

import torch

from tinyllm.bench import PRESETS
from tinyllm.config import RuntimeConfig
from tinyllm.model.transformer import DecoderLayer
from tinyllm.train.runtime import INDUCTOR_OPTIONS, compile_options


def nest_decoder_layers() -> dict:
    """Makes every decoder layer's forward a nested compile region (Dynamo and Inductor compile one
    layer and run its graph for all of them) and returns the `torch.compile` keyword arguments it
    needs. Dense models only: an MoE layer's fp32 expert loop breaks the graph, and a region must be
    one graph. torch 2.13's Inductor gives wrong gradients around regions while it reuses buffers
    (`nested_region_grad_bug.py`), so that is off from 2.12 (2.12 untried)."""
    if not hasattr(DecoderLayer.forward, "__marked_compile_region_fn__"):  # once, however often it is called
        DecoderLayer.forward = torch.compiler.nested_compile_region(DecoderLayer.forward)
    buffers = {"allow_buffer_reuse": False} if torch.__version__ >= "2.12" else {}
    return {"options": {**INDUCTOR_OPTIONS, **buffers}}


def add_regions_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--regions", action="store_true",
                        help="each decoder layer a nested compile region (regions.py; not what the engine does)")


def regions_compile_kwargs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """For a bench's `--regions` (with its `--model` and `--no-compile`): the layers nested and
    `torch.compile`'s keyword arguments for them; the training engine's arguments without the flag;
    a usage error where regions cannot go (an eager run, an MoE preset)."""
    if not args.regions:
        return compile_options(RuntimeConfig(compile=True))
    if not args.compile or "moe" in PRESETS[args.model]:
        parser.error("--regions: a compiled dense model only (an MoE layer's expert loop breaks the region's graph)")
    return nest_decoder_layers()
