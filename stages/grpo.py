"""Stage grpo: reinforcement learning with verifiable rewards from the DPO model → artifacts/grpo/.

The prompts (artifacts/data/grpo.jsonl) have answers a program checks: arithmetic problems that
neither the corpus nor any eval set contains, and fact questions eval does not ask. With
grpo.enabled false, or no such prompts (a user's corpus), the stage writes a note only, and eval,
chat and export take the dpo model. Several processes: `distributed.nproc` in params.
"""

from pathlib import Path

from tinyllm.stage import stage_main, write_json, write_skipped
from tinyllm.train.distributed import training_run
from tinyllm.train.grpo import run_grpo

OUT = Path("artifacts/grpo")
PROMPTS = Path("artifacts/data/grpo.jsonl")


def train(params, init: Path, out: Path, run=None) -> dict:
    """The stage's training from `init` to `out` (also what stages/compile_ahead.py compiles ahead)."""
    return run_grpo(params, init, PROMPTS, out, run)


@stage_main
def main(params):
    with training_run("grpo", params) as run:
        skip = "grpo.enabled is false in params.yaml" if not params.grpo.enabled else (
            None if PROMPTS.stat().st_size else f"{PROMPTS} is empty: no prompts with checkable answers")
        if skip:
            write_skipped("grpo", OUT, skip, run)
            return
        summary = train(params, Path("artifacts/dpo"), OUT, run)
        if run.dist.is_main:
            write_json(Path("reports/metrics/grpo.json"), {"enabled": True, **summary})


if __name__ == "__main__":
    main()
