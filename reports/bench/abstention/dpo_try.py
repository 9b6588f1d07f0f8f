"""One quick DPO abstention experiment on the default run's lora model → one result line.

    python reports/bench/abstention/dpo_try.py --lr 1e-4 --nll-coef 1.0 --steps 150 [--on-policy] [--contrast]

Trains the dpo stage's objective from artifacts/lora on artifacts/data/dpo.jsonl (into a temporary
folder; nothing of the pipeline is touched) and scores greedy replies: the share of eval_unknown
questions answered with an abstention, of eval_qa questions wrongly answered with one, and QA
accuracy. --on-policy replaces each abstention pair's rejected reply (a canonical invented fact)
by the lora model's own greedy answer; --contrast adds 300 pairs about SFT people whose rejected
reply is an abstention. About 25 s on 2 CPU cores. Not part of CI; results in reports/abstention.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import tempfile
from pathlib import Path

from tinyllm.config import load_params
from tinyllm.data.chat_data import ABSTAIN, _msg, _question, answer_sentence
from tinyllm.data.world import ATTRIBUTES, World
from tinyllm.eval.chat_eval import abstain_rate, answer_accuracy, chat_replies, is_abstention
from tinyllm.infer.chat import load_chat_model
from tinyllm.train.dpo import run_dpo

DATA = Path("artifacts/data")
START = Path("artifacts/lora")


def pairs(on_policy: bool, contrast: bool) -> list[dict]:
    all_pairs = [json.loads(line) for line in (DATA / "dpo.jsonl").open()]
    if on_policy:
        model, tok, _ = load_chat_model(START)
        unknown = [p for p in all_pairs if is_abstention(p["chosen"][-1]["content"])]
        replies = chat_replies(model, tok, [p["chosen"][:-1] for p in unknown], 32)
        for pair, reply in zip(unknown, replies):
            pair["rejected"] = pair["chosen"][:-1] + [_msg("assistant", reply)]
    if contrast:
        world = World.from_json(json.loads((DATA / "world.json").read_text()))
        rng = random.Random(0)
        for person in rng.sample([p for p in world.people if p.split == "sft"], 150):
            for attribute in rng.sample(ATTRIBUTES, 2):
                lang = "en" if person.bios_en and rng.random() < 0.2 else "zh"
                question = [_msg("user", _question(person, attribute, lang, rng))]
                abstain = rng.choice(ABSTAIN[lang]).format(name=getattr(person.name, lang))
                all_pairs.append({"chosen": question + [_msg("assistant", answer_sentence(person, attribute, lang))],
                                  "rejected": question + [_msg("assistant", abstain)]})
    return all_pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--nll-coef", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--on-policy", action="store_true")
    parser.add_argument("--contrast", action="store_true")
    args = parser.parse_args()
    params = load_params("params.yaml")
    params = dataclasses.replace(
        params, checkpoint=dataclasses.replace(params.checkpoint, interval=0),
        dpo=dataclasses.replace(params.dpo, lr=args.lr, min_lr=args.lr / 10, nll_coef=args.nll_coef,
                                max_steps=args.steps))
    with tempfile.TemporaryDirectory() as tmp:
        pairs_file = Path(tmp) / "pairs.jsonl"
        chosen_pairs = pairs(args.on_policy, args.contrast)
        pairs_file.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in chosen_pairs))
        run_dpo(params, START, pairs_file, Path(tmp) / "dpo")
        model, tok, _ = load_chat_model(Path(tmp) / "dpo")
    unknown = [json.loads(line) for line in (DATA / "eval/eval_unknown.jsonl").open()]
    qa = [json.loads(line) for line in (DATA / "eval/eval_qa.jsonl").open()]
    unknown_replies = [{"reply": r} for r in chat_replies(model, tok, [i["messages"] for i in unknown], 24)]
    accuracy, qa_rows = answer_accuracy(model, tok, qa, 24, len(qa), params.seed)
    print(f"{vars(args)}: unknown_abstain {abstain_rate(unknown_replies):.3f} "
          f"known_false_abstain {abstain_rate(qa_rows):.3f} qa_heldout {accuracy['heldout']:.3f}")

if __name__ == "__main__":
    main()
