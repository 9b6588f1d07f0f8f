"""Stage prepare: the embedded fictional world (or a user's JSON Lines) → artifacts/data/."""

from pathlib import Path

from tinyllm import pretrain_ahead
from tinyllm.data.prepare import prepare
from tinyllm.stage import stage_main, write_json


@stage_main
def main(params):
    pretrain_ahead.start_on_a_gpu()  # pretraining's step compiles while the data is made
    stats = prepare(params, Path("artifacts/data"), Path("data/world/lexicon.json"))
    write_json(Path("reports/metrics/prepare.json"), stats)


if __name__ == "__main__":
    main()
