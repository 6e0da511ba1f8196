"""Which committed race cells of local SGD the stop without a meeting could have changed.

The forecast stop applies from a run's first round on, and only to rounds that
meet (not overlapped ones). For each race directory, link and setting: the
cells, their steps, and for rounds that meet how many each cell reached.

    python docs/results/local-sgd-stop/race_cells.py
"""

import collections
import glob
import json
import os

cells = collections.defaultdict(list)
for path in sorted(glob.glob("docs/results/race*/**/local-sgd-*.json", recursive=True)):
    cell = json.load(open(path))
    settings = cell.get("settings", {})
    link = os.path.basename(path).removeprefix("local-sgd-").rsplit("-s", 1)[0]
    key = (os.path.relpath(os.path.dirname(path), "docs/results"), link, settings.get("average_every"), settings.get("average_overlap"))
    cells[key].append(cell["steps"])
print("| race directory | link | H | overlapped | cells | steps | rounds that met, per cell |\n|---|---|---|---|---|---|---|")
for (where, link, every, overlap), steps in cells.items():
    rounds = "none meet" if overlap else ", ".join(str(s // every) for s in steps)
    print(f"| {where} | {link} | {every} | {'yes' if overlap else 'no'} | {len(steps)} | {min(steps)}-{max(steps)} | {rounds} |")
