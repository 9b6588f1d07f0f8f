"""Stage pretrain: train from scratch on the token shards → artifacts/pretrain/ (safetensors).

Several processes: `distributed.nproc` in params (or `torchrun --nproc_per_node N -m stages.pretrain`).
"""

from pathlib import Path

from stages.compile_ahead import compile_ahead
from tinyllm.stage import stage_main, write_json
from tinyllm.train.distributed import training_run
from tinyllm.train.pretrain import run_pretrain


@stage_main
def main(params):
    with training_run("pretrain", params) as run, compile_ahead(params, run.dist):
        summary = run_pretrain(params, Path("artifacts/tokens"), Path("artifacts/tokenizer"),
                               Path("artifacts/pretrain"), run)
        if run.dist.is_main:
            write_json(Path("reports/metrics/pretrain.json"), summary)


if __name__ == "__main__":
    main()
