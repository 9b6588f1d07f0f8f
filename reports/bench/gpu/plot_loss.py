"""Plot the loss curves of `tinyllm bench train` tables against each other (the curves are in the JSON).

    python reports/bench/gpu/plot_loss.py OUT.png TABLE.json LABEL [TABLE.json LABEL ...]
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

out, pairs = sys.argv[1], list(zip(sys.argv[2::2], sys.argv[3::2]))
fig, ax = plt.subplots(figsize=(7, 4))
for table, label in pairs:
    data = json.loads(Path(table).read_text())
    row = data["rows"][0]
    steps, losses = zip(*row["loss_curve"])
    ax.plot(steps, losses, label=f"{label} ({row['tokens_per_sec'] / 1e3:.0f}k tokens/s)")
ax.set(xlabel="step", ylabel="train loss", yscale="log",
       title=f"{row['model']}, seq {row['seq']}, batch {row['batch']}, same batches — {data['card']}")
ax.legend()
fig.tight_layout()
fig.savefig(out, dpi=120)
