"""Is there a "do I know this name" direction in the chat model's hidden states? → stdout.

    python reports/bench/abstention/probe.py artifacts/lora

A reply that abstains must decide at its first token. This script fits a logistic regression on
each layer's hidden state (and on all layers at once) at two positions: the last prompt token
(where the reply's first token is chosen) and the name's last token. It trains on questions
about 190 SFT people against the 150 unknown people of the DPO pairs, and reports the AUC on the
other SFT people and on the held-out people, each against eval_unknown's people, and the share
of known people it would call unknown at 85% recall on the unknown ones. Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from tinyllm.data.chat_data import _question
from tinyllm.data.tokenizer import render_chat
from tinyllm.data.world import ATTRIBUTES, World
from tinyllm.infer.chat import load_chat_model

WORLD = Path("artifacts/data/world.json")


def questions(people, rng: random.Random, per_person: int = 3) -> list[tuple[str, str]]:
    """(question, name as written in it), per_person attributes per person."""
    out = []
    for p in people:
        for a in rng.sample(ATTRIBUTES, per_person):
            lang = "en" if rng.random() < (0.3 if p.bios_en else 0.2 if p.split == "unknown" else 0) else "zh"
            out.append((_question(p, a, lang, rng), getattr(p.name, lang)))
    return out


def hidden_states(model, tok, items: list[tuple[str, str]], at_name: bool) -> torch.Tensor:
    """(items, layers × dim): every layer's output at the chosen position."""
    captured = {}
    hooks = [layer.register_forward_hook(lambda mod, inp, out, i=i: captured.__setitem__(i, out[0][0]))
             for i, layer in enumerate(model.model.layers)]
    rows = []
    for question, name in items:
        text = render_chat([{"role": "user", "content": question}], add_generation_prompt=True)
        enc = tok.encode(text, add_special_tokens=False)
        end = text.index(name) + len(name)
        pos = max(i for i, (a, _) in enumerate(enc.offsets) if a < end) if at_name else -1
        with torch.no_grad():
            model(torch.tensor(enc.ids)[None])
        rows.append(torch.cat([captured[i][pos] for i in range(len(hooks))]))
    for hook in hooks:
        hook.remove()
    return torch.stack(rows).float()


def fit_probe(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-2):
    """Logistic regression on standardised features; returns the scoring function."""
    mean, std = x.mean(0), x.std(0) + 1e-5
    w, b = torch.zeros(x.shape[1], requires_grad=True), torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits((x - mean) / std @ w + b, y) + l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda z: ((z - mean) / std @ w + b).detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    args = parser.parse_args()
    model, tok, _ = load_chat_model(args.checkpoint)
    world = World.from_json(json.loads(WORLD.read_text()))
    sft = [p for p in world.people if p.split == "sft"]
    random.Random(1).shuffle(sft)
    heldout = [p for p in world.people if p.split == "heldout"]
    groups = {"sft_train": sft[:190], "sft_test": sft[190:], "heldout": heldout,
              "unknown_train": list(world.unknown[:150]), "unknown_test": list(world.unknown[150:])}
    items = {name: questions(people, random.Random(name)) for name, people in groups.items()}
    dim, n_layers = model.config.dim, model.config.n_layers
    print("| position | layers | AUC, other SFT people | AUC, held-out people | held-out called unknown at 85% |")
    print("|---|---|---|---|---|")
    for at_name in (False, True):
        x = {name: hidden_states(model, tok, qs, at_name) for name, qs in items.items()}
        for layers in [[i] for i in range(n_layers)] + [list(range(n_layers))]:
            cols = torch.cat([torch.arange(i * dim, (i + 1) * dim) for i in layers])
            train = torch.cat([x["sft_train"], x["unknown_train"]])[:, cols]
            labels = torch.cat([torch.ones(len(x["sft_train"])), torch.zeros(len(x["unknown_train"]))])
            score = fit_probe(train, labels)
            unknown = score(x["unknown_test"][:, cols])
            threshold = unknown.sort().values[round(0.85 * len(unknown)) - 1]
            aucs = [float((score(x[g][:, cols])[:, None] > unknown[None]).float().mean())
                    for g in ("sft_test", "heldout")]
            false_unknown = float((score(x["heldout"][:, cols]) <= threshold).float().mean())
            where = "name" if at_name else "reply start"
            print(f"| {where} | {layers} | {aucs[0]:.3f} | {aucs[1]:.3f} | {false_unknown:.1%} |")


if __name__ == "__main__":
    main()
