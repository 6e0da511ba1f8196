#!/usr/bin/env python
"""The reference work's open questions, as studies that one command reproduces.

    python scripts/study.py parts              # Q1: how many parts can a flow be split into?
    python scripts/study.py finetune           # Q2: is the end-to-end phase needed?
    python scripts/study.py wire               # bfloat16 latents on the wire against float32
    python scripts/study.py parts --quick      # a reduced version, to check the direction
    python scripts/study.py --spec FILE.json   # a study of your own (same format as `--show`)

A study is a list of arms (configs that differ from a shared base) run over
seeds. Every arm is paired, seed by seed, with its baseline arm (end to end
with the same data, model and total epochs): the difference in test BPD at the
same epochs and at the same wall clock (as measured, and for a simultaneous run
also at the time it would take with its parts in parallel, one device each:
the slowest part's share of the parts phase, communication not counted), its
mean, a 95% Student-t interval and
a verdict: better, worse, within ±0.02 BPD, or undecided (with about how many
seeds would decide it). The statistics are compare.py's.

Runs go under --storage-path/<study>/; a finished run is read back, never
trained again, so a stopped study resumes where it stopped. Written under
--out/<study>/: ``table.md``, ``results.json`` (every number, and a record of
every run: its settings, results and test curve) and ``figure.png``. The
records are read back too: a study whose results.json is committed reruns
nothing on a fresh clone, and new runs (more seeds, more arms) join the
published ones. ``--arms`` and ``--seeds`` narrow what is trained; the outputs
always cover every finished run of the study.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from raylocal.core.config import load_config_file
from raylocal.errors import ConfigError, RaylocalError
from raylocal.study.compare import bpd_at_time, changed_settings, parse_seeds, run_config
from raylocal.study.stats import EQUIVALENCE, adjust_family, decide, mean_interval


@dataclass
class Study:
    """Arms (overrides of ``base``) over seeds, each paired with its baseline arm."""

    name: str
    question: str
    base: dict[str, Any]
    arms: dict[str, dict[str, Any]]
    baseline: str
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    x: str = ""  # the figure's x axis: an override key every arm sets, or "staleness" (measured)
    contrasts: dict[str, str] = field(default_factory=dict)  # arm -> another arm it is also paired with

    def check(self) -> None:
        if self.baseline not in self.arms:
            raise ConfigError(f"study {self.name!r}: baseline {self.baseline!r} is not one of its arms")
        for arm, other in self.contrasts.items():
            if arm not in self.arms or other not in self.arms:
                raise ConfigError(f"study {self.name!r}: contrast {arm!r} - {other!r} names an arm it does not have")
        if self.x and self.x != "staleness" and any(self.x not in a for a in self.arms.values()):
            raise ConfigError(f"study {self.name!r}: x {self.x!r} is not set by every arm")
        names = list(self.arms)
        for arm, values in self.arms.items():
            other = values.get(EQUAL_TIME_OF)
            if other is not None and (other not in names[: names.index(arm)] or self.baseline == arm):
                raise ConfigError(
                    f"study {self.name!r}: {arm} is planned for the time of {other!r}, which must be an arm "
                    "listed before it (and it cannot be the baseline, whose epoch time plans it)"
                )

    def run_name(self, arm: str, seed: int) -> str:
        return f"{arm}-seed{seed}"


# The model and data of the built-in studies: big enough that parts and e2e
# separate, small enough for the full versions to fit about 10 hours of 2 cores.
# The LR decays (one cosine over the whole run, parts phase and fine-tune): at a
# constant LR the test BPD of the last epochs swung by up to 0.5 from one epoch to
# the next (docs/study.md), which no affordable number of seeds could pair away.
# The LR is e2e's better one: at 1e-3 e2e ended 0.62 BPD behind e2e at 1e-2 (the
# lr study, docs/study.md), so parts compared at 1e-3 were compared with a poor e2e.
MNIST_BASE = {
    "dataset": "mnist", "data_root": "data/mnist", "n_levels": 2, "depth": 4, "hidden": 64,
    "batch_size": 64, "train_subset": 10000, "test_subset": 2000, "warmup_steps": 100,
    "lr": [1e-2], "lr_schedule": "cosine-run", "threads": 1, "samples": 0, "progress": False,
    "eval_batch_size": 1000,
}  # fmt: skip


def _scale(quick: bool) -> dict[str, Any]:
    """The data and seeds of a built-in study, full or ``--quick``."""
    # --quick trains ~140 steps: a warmup of 100 would be most of them
    subset = {"train_subset": 3000, "test_subset": 1000, "warmup_steps": 20} if quick else {}
    return {"base": MNIST_BASE | subset, "seeds": [0, 1] if quick else [0, 1, 2]}


def parts_study(quick: bool) -> Study:
    """Q1: K parts across blocks, balanced, simultaneous (the async method's
    single-process twin), a fixed number of epochs and a fixed fine-tune."""
    epochs, finetune = (2, 1) if quick else (8, 2)
    ks = [2, 4, 8] if quick else [2, 3, 4, 6, 8]
    arms = {"e2e": {"schedule": "e2e", "parts": 1, "epochs": epochs + finetune}}
    for k in ks:
        arms[f"{k}-parts"] = {"schedule": "simultaneous", "parts": k, "epochs": epochs, "finetune_epochs": finetune}
    for a in arms.values():
        a.setdefault("finetune_epochs", 0)
    return Study(
        name="parts",
        question="How many parts can a flow be split into?",
        arms=arms,
        baseline="e2e",
        x="parts",
        **_scale(quick),
    )


def boundary_study(quick: bool) -> Study:
    """Q1's follow-up: where one boundary goes. Two parts, the boundary after 1,
    2 or 3 of block 1's flow steps, after block 1 (its split included) or 2
    steps into block 2; otherwise Q1's two-part arm (which the balanced split
    cuts after step 3). Q1 broke where its first part shrank to one or two flow
    steps: is it the position of a boundary or the number of boundaries?"""
    epochs, finetune = (2, 1) if quick else (8, 2)
    shape = {"schedule": "simultaneous", "parts": 2, "epochs": epochs, "finetune_epochs": finetune}
    specs = {
        "step-1": "1[:1]|1[1:],2", "step-2": "1[:2]|1[2:],2", "step-3": "1[:3]|1[3:],2", "block-1": "1|2",
        "step-6": "1,2[:2]|2[2:]",
    }  # fmt: skip
    arms: dict[str, dict[str, Any]] = {
        "e2e": {"schedule": "e2e", "parts": 1, "epochs": epochs + finetune, "finetune_epochs": 0}
    }
    arms |= {f"after-{where}": shape | {"part_spec": spec} for where, spec in specs.items()}
    return Study(
        name="boundary",
        question="Where can one boundary go?",
        arms=arms,
        baseline="e2e",
        **_scale(quick),
    )


def finetune_study(quick: bool) -> Study:
    """Q2: the fine-tune's share of a fixed epoch budget, and a boundary-only fine-tune."""
    total = 3 if quick else 12
    shares = [0, 33] if quick else [0, 10, 25, 33]
    arms: dict[str, dict[str, Any]] = {"e2e": {"schedule": "e2e", "parts": 1, "epochs": total, "finetune_epochs": 0}}
    contrasts: dict[str, str] = {}  # each fine-tune against none (what it buys); the boundary scope against all
    for k in [2] if quick else [2, 4]:
        for share in shares:
            ft = round(total * share / 100)
            arms[f"{k}-parts-ft{share}"] = {
                "schedule": "simultaneous", "parts": k, "epochs": total - ft, "finetune_epochs": ft,
            }  # fmt: skip
            if share:
                contrasts[f"{k}-parts-ft{share}"] = f"{k}-parts-ft0"
        ft = round(total * shares[-1] / 100)
        arms[f"{k}-parts-ft{shares[-1]}-boundary"] = {
            "schedule": "simultaneous", "parts": k, "epochs": total - ft, "finetune_epochs": ft,
            "finetune_scope": "boundary",
        }  # fmt: skip
        contrasts[f"{k}-parts-ft{shares[-1]}-boundary"] = f"{k}-parts-ft{shares[-1]}"
    return Study(
        name="finetune",
        question="Is the last end-to-end phase needed?",
        arms=arms,
        baseline="e2e",
        contrasts=contrasts,
        **_scale(quick),
    )


def lr_study(quick: bool) -> Study:
    """Q3: three parts trained together at one LR for every part, against the same
    LR with ``--lr-rule relative-update`` and against per-part LRs chosen by a Ray
    Tune study (see ``tuned``), at a safe LR and at a high one (where one LR
    makes a part worse than it is at the safe LR). The Tune study searches
    3e-4 to 2e-2 for every part, so one of them serves both LRs."""
    epochs, finetune = (2, 1) if quick else (8, 2)
    # the Tune study's trials: LRs per part from tune_spaces/independent.py, chosen on held-out training images
    scale = _scale(quick)
    tune = {"space": "tune_spaces/independent.py", "trials": 4 if quick else 8, "seed": 100}
    tune["validation"] = 1000 if quick else 2000
    tune["report_every"] = scale["base"]["train_subset"] // scale["base"]["batch_size"]  # once an epoch
    arms: dict[str, dict[str, Any]] = {"e2e": {"schedule": "e2e", "parts": 1, "epochs": epochs + finetune}}
    contrasts = {}
    for lr in ["1e-3", "1e-2"]:
        # the fine-tune at e2e's LR in every arm: the arms differ in their parts phase only
        shape = {"schedule": "simultaneous", "parts": 3, "epochs": epochs, "finetune_epochs": finetune}
        shape |= {"lr": [float(lr)]} | ({"finetune_lr": 1e-3} if lr != "1e-3" else {})  # (1e-3: the default)
        arms[f"one-lr-{lr}"] = shape
        arms[f"rule-{lr}"] = shape | {"lr_rule": "relative-update"}
        contrasts[f"rule-{lr}"] = f"one-lr-{lr}"
    arms["tuned"] = shape | {"tune_lr": tune}  # the search spans both LRs: one Tune study
    contrasts["tuned"] = "one-lr-1e-3"
    arms["e2e"] |= {"finetune_epochs": 0, "lr": [1e-3]}
    # e2e at the high LR too: parts that gain from a higher LR are compared with e2e at its own better LR
    arms["e2e-1e-2"] = arms["e2e"] | {"lr": [1e-2]}
    contrasts["one-lr-1e-2"] = "e2e-1e-2"
    return Study(
        name="lr",
        question="Is there a natural way to set each part's learning rate?",
        arms=arms,
        baseline="e2e",
        contrasts=contrasts,
        **scale,
    )


def outage_link(n_steps: int, down: float, length: int) -> tuple[str, int]:
    """A link down for ``down`` of ``n_steps`` sender steps, in evenly spread
    outages of about ``length`` steps (fewer, longer ones when the run is short):
    the deterministic step-based spec, and the outage length it got."""
    total = round(down * n_steps)
    if total <= 0:
        return "up", 0
    count = max(1, round(total / length))
    each, period = max(1, total // count), n_steps // count
    starts = [i * period + (period - each) // 2 for i in range(count)]
    return "outage=" + ",".join(f"{a}:{each}" for a in starts), each


def staleness_study(quick: bool) -> Study:
    """Q4: async parts whose link is down for a share of the steps, in short or
    long outages, with weight syncs every 1, 50 or 500 steps; the downstream part
    trains on its stale copy of the upstream part meanwhile. The evenly spread
    outages end before the parts phase does; one more arm keeps the link down
    for the last 60% of it, so that the parts phase ends on stale latents."""
    epochs, finetune = (2, 1) if quick else (8, 2)
    scale = _scale(quick)
    n_steps = epochs * (scale["base"]["train_subset"] // scale["base"]["batch_size"])
    shape = {"schedule": "async", "epochs": epochs, "finetune_epochs": finetune, "starve": "stale"}
    arms: dict[str, dict[str, Any]] = {"e2e": {"schedule": "e2e", "parts": 1, "epochs": epochs + finetune}}
    contrasts: dict[str, str] = {}  # every outage arm against its parts with the link up: what staleness alone costs
    grid = [(0.3, 50)] if quick else [(0.1, 50), (0.3, 50), (0.6, 50), (0.1, 500), (0.3, 500), (0.6, 500)]
    for k in [2] if quick else [2, 3]:
        arms[f"{k}p-up"] = shape | {"parts": k, "link": "up"}
        for down, length in grid:
            link, each = outage_link(n_steps, down, length)
            arm = f"{k}p-down{round(down * 100)}-len{each}"
            arms[arm], contrasts[arm] = shape | {"parts": k, "link": link}, f"{k}p-up"
        if not quick:  # the centred outages leave the last steps fresh; this one runs to the parts phase's end
            total = round(0.6 * n_steps)
            arm = f"{k}p-down60-len{total}-at-end"
            arms[arm] = shape | {"parts": k, "link": f"outage={n_steps - total}:{total}"}
            contrasts[arm] = f"{k}p-up"
        link, each = outage_link(n_steps, 0.3, 50)
        for sync in [1, 500]:  # the weight syncs that keep a stale copy close, at one outage pattern
            arm = f"{k}p-down30-len{each}-sync{sync}"
            arms[arm], contrasts[arm] = shape | {"parts": k, "link": link, "sync_every": sync}, f"{k}p-up"
    return Study(
        name="staleness",
        question="What does staleness cost?",
        arms=arms,
        baseline="e2e",
        x="staleness",
        contrasts=contrasts,
        **scale,
    )


def wire_study(quick: bool) -> Study:
    """Issue 16's bfloat16 target: latents rounded to bfloat16 at the boundary (as
    async's wire sends them) against float32, at the same steps, paired by seed."""
    epochs = 2 if quick else 4
    shape = {"schedule": "simultaneous", "parts": 2, "epochs": epochs, "finetune_epochs": 0, "lr": [1e-3]}
    return Study(
        name="wire",
        question="What does bfloat16 on the wire cost?",
        arms={"float32": shape | {"wire_dtype": "float32"}, "bfloat16": shape | {"wire_dtype": "bfloat16"}},
        baseline="float32",
        **_scale(quick),
    )


# An arm {"equal_time_of": ARM}: e2e planned from the start for the time ARM took
# (its own epochs, so its own warmup and decay), at the seed's e2e epoch time.
EQUAL_TIME_OF = "equal_time_of"


def reference_study(quick: bool, epochs: int | None = None, name: str = "reference") -> Study:
    """Issue 31: the reference work's own protocol (its Table 1, rows 2, 3 and 5).
    Two parts, across blocks or by block, alternating epochs for two thirds of
    the epochs, then an end-to-end fine-tune for the last third, against e2e of
    the same total epochs; three parts across blocks at a smaller LR, as the
    reference ran them; and e2e planned for the time the 2-part run took. Every
    trainer warms up and decays over its own steps (``cosine``), the fine-tune
    from its own start, the same in every arm. The length, 24 epochs, from the
    pilot (docs/study.md, "The reference protocol"): e2e there ends 7% above
    its own 48-epoch BPD, as far from converged as the reference's e2e was.
    Seeds declared here, before the study ran: 8."""
    total = epochs or (6 if quick else 24)
    parts, finetune = 2 * total // 3, total - 2 * total // 3
    alternating = {"schedule": "alternating", "epochs": parts, "finetune_epochs": finetune}
    arms = {
        "e2e": {"schedule": "e2e", "parts": 1, "epochs": total},
        "2p-across": alternating | {"parts": 2, "split": "across-blocks"},
        "2p-by-block": alternating | {"parts": 2, "split": "by-block"},
        "3p-across": alternating | {"parts": 3, "split": "across-blocks", "lr": [3e-3]},
        "e2e-equal-time": {"schedule": "e2e", "parts": 1, EQUAL_TIME_OF: "2p-across"},
    }
    quick_data = {"train_subset": 3000, "test_subset": 1000, "warmup_steps": 20} if quick else {}
    return Study(
        name=name,
        question=f"Does the reference claim replicate at {total} epochs: 2 alternating parts + a third as fine-tune "
        "within 0.01-0.02 BPD of e2e, in about 70% of the time?",
        base=MNIST_BASE | {"lr_schedule": "cosine"} | quick_data,
        arms=arms,
        baseline="e2e",
        seeds=[0, 1] if quick else list(range(8)),
        contrasts={"2p-across": "e2e-equal-time"},
    )


STUDIES = {
    "parts": parts_study, "boundary": boundary_study, "finetune": finetune_study, "lr": lr_study,
    "staleness": staleness_study, "wire": wire_study, "reference": reference_study,
    # near convergence: not run (48 epochs on the study's data is not converged; see docs/study.md)
    "reference-converged": lambda quick: reference_study(quick, 9 if quick else 48, "reference-converged"),
}  # fmt: skip


def keep_arms(study: Study, names: list[str]) -> None:
    """Narrow a study to some of its arms (and its baseline): more seeds for one
    comparison, without rerunning the rest."""
    unknown = [n for n in names if n not in study.arms]
    if unknown:
        raise ConfigError(f"--arms: {unknown[0]!r} is not an arm of study {study.name!r} ({', '.join(study.arms)})")
    study.arms = {a: o for a, o in study.arms.items() if a in names or a == study.baseline}
    study.contrasts = {a: o for a, o in study.contrasts.items() if a in study.arms and o in study.arms}


def rebase_lr(study: Study, lr: float) -> None:
    """The study at another base LR, under a name of its own (its runs are other
    runs: they are stored, and tabled, apart). Arms that set their LR keep it."""
    if not lr > 0:
        raise ConfigError(f"--base-lr: {lr:g} is not a positive LR")
    study.base = study.base | {"lr": [lr]}
    study.name += f"-lr{lr:g}"


def load_study(path: Path) -> Study:
    try:
        study = Study(**json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise ConfigError(f"--spec {path}: not a study ({str(e).splitlines()[0]})") from None
    study.check()
    return study


def tuned(study: Study, arm: str, storage: Path) -> dict[str, Any]:
    """The arm's overrides. An arm with ``tune_lr`` ({"space", "trials", "seed",
    "validation", "report_every"}) takes its per-part LRs from a Ray Tune study of its own (ASHA,
    scripts/tune_lr.py): its trials are the lockstep async twin of the
    simultaneous schedule (queue 1) with no fine-tune, at a seed of their own, and
    are evaluated on the last ``validation`` training images, held out from them,
    so that the LRs are not chosen on the test set. It runs once; its best.json
    is read back after."""
    overrides = dict(study.arms[arm])
    spec = overrides.pop("tune_lr", None)
    if spec is None:
        return overrides
    root = storage / study.name
    best = root / f"tune-{arm}" / "best.json"
    if not best.is_file():
        from raylocal.tune import cli as tune_lr  # imports Ray Tune: only a tuned arm pays for it

        values = {**study.base, **overrides, "schedule": "async", "queue_size": 1, "finetune_epochs": 0}
        values |= {"seed": spec["seed"], "validation": spec["validation"], "storage_path": str(root)}
        root.mkdir(parents=True, exist_ok=True)
        config_path = root / f"tune-{arm}.json"
        config_path.write_text(json.dumps(values, indent=1) + "\n")
        argv = ["--config", str(config_path), "--space", spec["space"], "--trials", str(spec["trials"])]
        argv += ["--report-every", str(spec["report_every"]), "--study", f"tune-{arm}"]
        print(f"tuning {study.name}/{arm}: python scripts/tune_lr.py {' '.join(argv)}", flush=True)
        if tune_lr.main(argv) != 0:
            raise RaylocalError(f"the Tune study of arm {arm!r} failed (see {root / f'tune-{arm}'})")
    return overrides | {"lr": load_config_file(best).lr}


def run_study(
    study: Study, storage: Path, published: dict[str, dict[int, dict]], train: Study | None = None
) -> dict[str, dict[int, dict]]:
    """Every arm over every seed: {arm: {seed: record}}. A run finished under
    ``storage`` is read back; else one that ``published`` holds (the study's
    results.json: what was run elsewhere, or before this machine's storage was
    lost) for the same settings; else it is trained if ``train`` (the study,
    or a narrowing of it) has its arm and seed, and left out otherwise (and
    not tuned)."""
    runs: dict[str, dict[int, dict]] = {}
    for seed in study.seeds:  # seed-major: a stopped study has whole pairs to compare
        for arm in arm_order(study, seed):
            name = study.run_name(arm, seed)
            arm_values = planned(study, arm, seed, runs)
            if arm_values is None:  # planned for a run of this seed that is not there
                continue
            values = {**study.base, **arm_values, "seed": seed}
            if not (storage / study.name / name / "summary.json").is_file():
                old = published.get(arm, {}).get(seed)
                if old is not None:
                    _check_published(study, name, old, values)
                    runs.setdefault(arm, {})[seed] = old
                    continue
                if train is None or arm not in train.arms or seed not in train.seeds:
                    continue
            overrides = tuned(study, arm, storage)
            if overrides.pop(EQUAL_TIME_OF, None) is not None:
                overrides["epochs"] = arm_values["epochs"]
            path = Path(f"{study.name}/{arm}")
            summary = run_config(
                path,
                {**study.base, **overrides, "seed": seed, "run_name": name},
                str(storage / study.name),
                rerun=False,
            )
            runs.setdefault(arm, {})[seed] = record(summary, values)
    return runs


def arm_order(study: Study, seed: int) -> list[str]:
    """The order a seed's arms run in: rotated by one place from seed to seed, so that
    no arm always runs first (on a fresh, cool machine) or last; an arm planned for
    another arm's time runs after the arms it needs."""
    timed = [a for a in study.arms if EQUAL_TIME_OF in study.arms[a]]
    free = [a for a in study.arms if a not in timed]
    turn = study.seeds.index(seed) % len(free) if seed in study.seeds else 0
    return free[turn:] + free[:turn] + timed


def planned(study: Study, arm: str, seed: int, runs: dict[str, dict[int, dict]]) -> dict[str, Any] | None:
    """The arm's settings for this seed. An arm planned for another arm's time
    gets the epochs that the seed's e2e (the baseline) would train in that
    time, at the baseline's own epoch time (None while either run is missing)."""
    values = dict(study.arms[arm])
    other = values.get(EQUAL_TIME_OF)
    if other is None:
        return values
    timed, base = runs.get(other, {}).get(seed), runs.get(study.baseline, {}).get(seed)
    if timed is None or base is None:
        return None
    epoch_s = base["wall_time"] / (base["values"].get("epochs") or 1)
    return values | {"epochs": max(1, round(timed["wall_time"] / epoch_s))}


def _check_published(study: Study, name: str, old: dict, values: dict) -> None:
    """A published run stands for this one only if the study asked it for the same settings."""
    shown = changed_settings(old["values"], json.loads(json.dumps(values)))  # as results.json holds them
    if shown:
        raise ConfigError(f"{study.name}/{name} was published with other settings ({shown}); give another --out")


def record(summary: dict, values: dict[str, Any]) -> dict[str, Any]:
    """What a study keeps of a finished run, in its results.json: the settings the
    study asked for (before a Tune study chose the LRs) and every number its
    comparisons read, the test curve included, so that the run can be paired again
    without its run directory."""
    return {
        "values": values,
        "test_bpd": summary["test_bpd"],
        "after_parts": parts_phase_bpd(summary),
        "wall_time": summary["wall_time"],
        "cpu_time": sum(summary.get("phase_cpu", {}).values()) or None,  # this process's, all threads
        "parallel_epochs": parallel_epochs(summary),
        "rollbacks": summary["rollbacks"],
        "part_lrs": summary.get("part_lrs"),
        "staleness": staleness(summary),
        "curve": [
            {"epoch": c["epoch"], "elapsed": c["elapsed"], "test_bpd": c["test_bpd"]}
            for c in summary["curve"]
            if "live_images" not in c  # an async run's live evaluations on a subset
        ],
    }


def _read_results(path: Path) -> dict[str, Any]:
    try:
        results = json.loads(path.read_text())
        if not isinstance(results, dict) or "rows" not in results:
            raise ValueError("no rows")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a study's results.json ({str(e).splitlines()[0]})") from None
    return results


def published_runs(path: Path) -> dict[str, dict[int, dict]]:
    """The runs a study's results.json holds: {arm: {seed: record}} ({} where there is none)."""
    if not path.is_file():
        return {}
    runs = _read_results(path).get("runs", {})
    return {arm: {int(seed): r for seed, r in per_seed.items()} for arm, per_seed in runs.items()}


def parts_phase_bpd(summary: dict) -> float:
    """Test BPD when the parts phase ended (the final one for a run without parts)."""
    entries = [h for h in summary["history"] if h["phase"] == "parts"]
    return entries[-1]["test_bpd"] if entries else summary["test_bpd"]


def parallel_epochs(summary: dict) -> float | None:
    """How long a simultaneous run would take with its parts in parallel, one
    device each, in epochs of its own single-process time: its parts-phase epochs
    scaled by the slowest part's share of the parts' compute, plus its fine-tune
    epochs (communication not counted). In epochs rather than seconds because the
    share is a ratio of times measured together, so it holds when the host's
    speed changes between runs, and e2e does the same work per epoch. None for
    other schedules (an async run's parts already ran in parallel)."""
    part_time = summary.get("part_time")
    if summary.get("schedule") != "simultaneous" or not part_time or sum(part_time) <= 0:
        return None
    return summary["epochs"] * max(part_time) / sum(part_time) + summary["finetune_epochs"]


def bpd_at_epochs(run: dict, epochs: float) -> float:
    """A run's test BPD after a fractional number of epochs (linear between its evaluations)."""
    curve = run["curve"]
    return float(np.interp(epochs, [c["epoch"] for c in curve], [c["test_bpd"] for c in curve]))


def bpd_at_epoch(run: dict, epoch: float) -> float:
    """A run's test BPD after ``epoch`` epochs (its evaluation at that epoch)."""
    points = [c for c in run["curve"] if abs(c["epoch"] - epoch) < 1e-9]
    if not points:
        raise ConfigError(f"the baseline of seed {run['values'].get('seed', '?')} has no evaluation at epoch {epoch:g}")
    return points[-1]["test_bpd"]


def staleness(summary: dict) -> float | None:
    """An async run's measured staleness: mean upstream steps behind, averaged
    over its boundaries (None for a run that had no link between parts)."""
    behind = summary.get("behind_steps")
    return sum(b["mean"] for b in behind) / len(behind) if behind else None


def processes(run: dict[str, Any]) -> int:
    """How many processes computed a run at once: an async run's parts, else one."""
    values = run.get("values", {})
    if values.get("schedule") != "async":
        return 1
    return values["part_spec"].count("|") + 1 if values.get("part_spec") else int(values.get("parts", 1))


def same_load(run: dict[str, Any], base: dict[str, Any]) -> bool:
    """Were the two runs' wall clocks measured under the same load on the host
    (processes and threads each)? Only then is "the same wall clock" a
    comparison; async parts on K processes against e2e on one is not."""
    threads = (run.get("values", {}).get("threads"), base.get("values", {}).get("threads"))
    return processes(run) == processes(base) and threads[0] == threads[1]


def time_ratios(per_seed: dict[int, dict], base: dict[int, dict], seeds: list[int]) -> dict[str, list[float]]:
    """Per seed, the arm's time over its baseline's: wall clock (only under the
    same load) and CPU seconds (where both runs recorded them)."""
    wall = [per_seed[s]["wall_time"] / base[s]["wall_time"] for s in seeds if same_load(per_seed[s], base[s])]
    cpu = [
        per_seed[s]["cpu_time"] / base[s]["cpu_time"]
        for s in seeds
        if per_seed[s].get("cpu_time") and base[s].get("cpu_time")
    ]
    return {"wall": wall, "cpu": cpu}


def _ratio_cell(ratios: dict[str, list[float]]) -> str:
    cells = []
    for key in ("wall", "cpu"):
        values = ratios.get(key) or []
        if values:
            mean, lo, hi = mean_interval(values)
            cells.append(f"{key} {mean:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if len(values) > 1 else ""))
    return "; ".join(cells)


def analyse(study: Study, runs: dict[str, dict[int, dict]]) -> list[dict[str, Any]]:
    """Per arm: its numbers per seed, and each comparison with its baseline. A
    comparison that needs the baseline's test curve (after the parts phase, at
    the same wall clock, in parallel) leaves out a seed whose baseline record has
    none (runs published before results.json kept curves)."""
    base = runs.get(study.baseline, {})
    rows = []
    for arm in [a for a in study.arms if a in runs]:  # the study's order, whichever seed finished first
        per_seed = runs[arm]
        seeds = sorted(set(per_seed) & set(base))
        if not seeds:  # --finished-only: no pair with the baseline yet
            continue
        config = study.arms[arm]
        parts_epochs = config.get("epochs", study.base.get("epochs", 1))
        row: dict[str, Any] = {"arm": arm, "config": config, "seeds": seeds}
        for key in ("after_parts", "wall_time", "parallel_epochs", "rollbacks", "part_lrs"):
            row[key] = [per_seed[s][key] for s in seeds]
        row["final"] = [per_seed[s]["test_bpd"] for s in seeds]
        row["staleness"] = [v for v in (per_seed[s]["staleness"] for s in seeds) if v is not None]
        row["time_ratio"] = time_ratios(per_seed, base, seeds)
        if arm != study.baseline:
            curved = [s for s in seeds if base[s]["curve"]]
            compared = {
                "final_same_epochs": [per_seed[s]["test_bpd"] - base[s]["test_bpd"] for s in seeds],
                "after_parts_same_epochs": [
                    per_seed[s]["after_parts"] - bpd_at_epoch(base[s], parts_epochs)
                    for s in curved
                    if config.get("schedule") != "e2e"  # (an e2e arm has no parts phase)
                ],
                "final_same_wall_clock": [
                    per_seed[s]["test_bpd"] - at_time
                    for s in curved
                    if same_load(per_seed[s], base[s])
                    and (at_time := bpd_at_time(base[s], per_seed[s]["wall_time"])) is not None
                ],
                "final_same_parallel_time": [
                    per_seed[s]["test_bpd"] - bpd_at_epochs(base[s], per_seed[s]["parallel_epochs"])
                    for s in curved
                    # against a baseline that trains as one model (e2e), not against another set of parts
                    if per_seed[s]["parallel_epochs"] is not None and base[s]["parallel_epochs"] is None
                ],
            }
            row["vs_baseline"] = {key: decide(diffs) for key, diffs in compared.items() if diffs}
        other = study.contrasts.get(arm)
        if other is not None and set(per_seed) & set(runs.get(other, {})):
            pairs = sorted(set(per_seed) & set(runs[other]))
            diffs = {
                key: [per_seed[s][field] - runs[other][s][field] for s in pairs]
                for key, field in (("final", "test_bpd"), ("after_parts", "after_parts"))
            }
            # seed by seed as well: Q4's figure plots each run's difference at its own staleness
            row["vs_contrast"] = {
                "arm": other, "seeds": pairs, "per_seed": diffs, "staleness": [per_seed[s]["staleness"] for s in pairs]
            } | {key: decide(values) for key, values in diffs.items()}  # fmt: skip
        rows.append(row)
    adjust_family(family(rows))
    return rows


def family(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every decided comparison of a study: its question's family, for Holm."""
    found = [d for r in rows for d in r.get("vs_baseline", {}).values()]
    found += [r["vs_contrast"][k] for r in rows if "vs_contrast" in r for k in ("final", "after_parts")]
    return found


def _mean_or_blank(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    return f"{sum(known) / len(known):.2f}" if known else ""


def _cell(d: dict[str, Any]) -> str:
    text = f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] {d['verdict']}"
    text += f" (~{d['seeds_to_decide']} seeds)" if d["seeds_to_decide"] else ""
    adjusted = d.get("adjusted", d["verdict"])
    return text + (f"; Holm: {adjusted}" if adjusted != d["verdict"] else "")


STALENESS = "staleness (mean upstream steps behind, per seed)"


def _per_seed(values: list[float]) -> str:
    return ", ".join(f"{x:.1f}" for x in values)


def table(study: Study, rows: list[dict[str, Any]]) -> str:
    stale = study.x == "staleness"
    done = sorted({s for r in rows for s in r["seeds"]})
    seeds = ", ".join(map(str, done))
    extra = [s for s in done if s not in study.seeds]
    if extra:
        seeds += f" (**{', '.join(map(str, extra))} beyond the {len(study.seeds)} seeds the study declared**)"
    elif done != sorted(study.seeds):
        seeds += f" finished (of {', '.join(map(str, study.seeds))})"
    lines = [
        f"**{study.question}** Seeds {seeds}; every difference is paired by seed "
        f"with `{study.baseline}`: mean [95% interval] and the verdict at level 0.05 (better or worse: a paired "
        f"t-test; within ±{EQUIVALENCE} BPD: two one-sided tests; identical: every seed's difference is 0; else "
        "undecided, with about how many seeds would decide it at 80% power), then, where it differs, the verdict "
        "after Holm's adjustment over all of this table's comparisons.",
        "",
        "| arm | seeds | test BPD (mean) | after the parts phase (mean) | wall time (s) | in parallel (epochs) | "
        "rollbacks | − baseline, same epochs | parts phase − baseline, same epochs | − baseline, same wall clock | "
        "− baseline, same time with the parts in parallel | time / baseline (mean [95%]) |"
        + (f" {STALENESS} |" if stale else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if stale else ""),
    ]
    for r in rows:
        cells = [
            r["arm"],
            ",".join(map(str, r["seeds"])),
            f"{sum(r['final']) / len(r['final']):.4f}",
            f"{sum(r['after_parts']) / len(r['after_parts']):.4f}",
            f"{sum(r['wall_time']) / len(r['wall_time']):.0f}",
            _mean_or_blank(r["parallel_epochs"]),
            "; ".join(",".join(map(str, rb)) for rb in r["rollbacks"]),
        ]
        vs = r.get("vs_baseline")
        keys = ("final_same_epochs", "after_parts_same_epochs", "final_same_wall_clock")
        keys += ("final_same_parallel_time",)
        cells += [_cell(vs[k]) if vs and k in vs else "" for k in keys]
        cells += [_ratio_cell(r.get("time_ratio", {})) if vs else ""]
        cells += [_per_seed(r["staleness"])] if stale else []
        lines.append("| " + " | ".join(cells) + " |")
    contrasted = [r for r in rows if "vs_contrast" in r]
    if contrasted:
        # the last column says what tells the paired arms apart: their staleness, or
        # their part LRs where some run gave its parts different LRs (else it is blank)
        lrs_differ = any(len(set(v)) > 1 for r in contrasted for v in r["part_lrs"] if v)
        last = STALENESS if stale else "its part LRs (seed by seed)" if lrs_differ else ""
        lines += [
            "",
            "Paired by seed with another arm:",
            "",
            "| arm | − arm | at the end | after the parts phase |" + (f" {last} |" if last else ""),
            "|---|---|---|---|" + ("---|" if last else ""),
        ]
        for r in contrasted:
            c = r["vs_contrast"]
            cells = [r["arm"], c["arm"], _cell(c["final"]), _cell(c["after_parts"])]
            if stale:  # of the seeds paired here (the row's are those paired with the baseline)
                cells.append(_per_seed([v for v in c["staleness"] if v is not None]))
            elif lrs_differ:
                cells.append("; ".join(",".join(f"{x:.3g}" for x in v) for v in r["part_lrs"] if v))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(study: Study, rows: list[dict[str, Any]], path: Path) -> None:
    """Test BPD minus the baseline's, per arm, with 95% intervals: after the parts
    phase and at the end (same epochs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if study.x == "staleness":
        _staleness_figure(study, rows, ax)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        return
    compared = [r for r in rows if "vs_baseline" in r]
    series = [(-0.15, "after_parts_same_epochs", "after the parts phase"), (0.15, "final_same_epochs", "at the end")]
    for offset, key, label in series:
        shown = [(i, r["vs_baseline"][key]) for i, r in enumerate(compared) if key in r["vs_baseline"]]
        xs = [i + offset for i, _ in shown]
        ds = [d for _, d in shown]
        means = [d["mean"] for d in ds]
        errs = [[d["mean"] - d["lo"] for d in ds], [d["hi"] - d["mean"] for d in ds]]
        errs = [[0 if math.isnan(e) else e for e in side] for side in errs]
        ax.errorbar(xs, means, yerr=errs, fmt="o", capsize=3, label=label)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.axhspan(-EQUIVALENCE, EQUIVALENCE, color="grey", alpha=0.15, label=f"±{EQUIVALENCE} BPD")
    ax.set_xticks(range(len(compared)), [r["arm"] for r in compared], rotation=30, ha="right")
    ax.set_ylabel(f"test BPD − {study.baseline} (paired by seed)")
    ax.set_title(study.question)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def staleness_points(rows: list[dict[str, Any]]) -> list[tuple[int, str, float, float]]:
    """Q4's figure, point by point: (K, "after_parts" or "final", the run's
    measured staleness, its test BPD minus the same parts' on an up link, same
    seed) for every async run of an arm contrasted with its up link."""
    points = []
    for r in rows:
        contrast = r.get("vs_contrast")
        if contrast is None:
            continue
        for key in ("after_parts", "final"):
            for stale, diff in zip(contrast["staleness"], contrast["per_seed"][key]):
                if stale is not None:
                    points.append((r["config"]["parts"], key, stale, diff))
    return points


def _staleness_figure(study: Study, rows: list[dict[str, Any]], ax: Any) -> None:
    """Q4's figure: every outage run against its parts on an up link (what
    staleness alone costs; the intervals are in the tables), one colour per K."""
    points = staleness_points(rows)
    for i, k in enumerate(sorted({p[0] for p in points})):
        for key, label, marker, face in [
            ("after_parts", "after the parts phase", "o", "none"),
            ("final", "after the fine-tune", "s", f"C{i}"),
        ]:
            mine = [p for p in points if p[0] == k and p[1] == key]
            ax.scatter([p[2] for p in mine], [p[3] for p in mine], marker=marker, facecolors=face,
                       edgecolors=f"C{i}", label=f"{k} parts, {label}")  # fmt: skip
    ax.axhline(0, color="black", linewidth=0.8)
    ax.axhspan(-EQUIVALENCE, EQUIVALENCE, color="grey", alpha=0.15, label=f"±{EQUIVALENCE} BPD")
    ax.set_xscale("symlog", linthresh=1.0)  # log beyond one step
    ax.set_xlim(0, 1.5 * max((p[2] for p in points), default=1.0))
    ax.set_xlabel("measured staleness: mean upstream steps behind")
    ax.set_ylabel("test BPD − the same parts on an up link (same seed)")
    ax.set_title(study.question)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def _pooled_settings(result: dict[str, Any], arm: str) -> dict[str, Any]:
    study = result["study"]
    return json.loads(json.dumps(study.get("base", {}) | study.get("arms", {}).get(arm, {})))


def pooled_contrasts(results: list[dict[str, Any]]) -> str:
    """Each contrast (an arm against another arm) over several studies'
    results.json at once, for the same question asked on several machines. A
    seed run on more than one machine is one pair, not several: its differences
    are averaged over the machines first (each difference still a pair made on
    one machine, at one commit), then the per-seed means decide, Holm-adjusted
    over the contrasts of the table. Refused: a study given twice, and an arm
    that ran with other settings in one of them. A markdown table."""
    names = [r["study"]["name"] for r in results]
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:
        raise ConfigError(f"--pool: study {twice!r} is given twice")
    pooled: dict[tuple[str, str], dict[int, list[tuple[float, float]]]] = {}
    settings: dict[str, tuple[str, dict[str, Any]]] = {}
    for result in results:
        for r in result["rows"]:
            c = r.get("vs_contrast")
            if c is None:
                continue
            for arm in (r["arm"], c["arm"]):
                mine = _pooled_settings(result, arm)
                first = settings.setdefault(arm, (result["study"]["name"], mine))
                changed = changed_settings(first[1], mine)
                if changed:
                    raise ConfigError(f"--pool: {arm} ran with other settings in {first[0]} than in "
                                      f"{result['study']['name']} ({changed})")  # fmt: skip
            per_seed = pooled.setdefault((r["arm"], c["arm"]), {})
            for k, seed in enumerate(c["seeds"]):
                per_seed.setdefault(int(seed), []).append((c["per_seed"]["final"][k], c["per_seed"]["after_parts"][k]))
    rows = []
    for (arm, other), per_seed in pooled.items():
        seeds = sorted(per_seed)
        final = [float(np.mean([d[0] for d in per_seed[s]])) for s in seeds]
        after = [float(np.mean([d[1] for d in per_seed[s]])) for s in seeds]
        machines = sum(len(per_seed[s]) for s in seeds)
        rows.append((arm, other, f"{len(seeds)} ({machines} pairs)", decide(final), decide(after)))
    adjust_family([d for row in rows for d in row[3:]])
    lines = [
        f"Pooled over {', '.join(names)} (each seed's differences averaged over the machines that ran it):",
        "",
        "| arm | − arm | seeds (pairs) | at the end | after the parts phase |",
        "|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join([arm, other, n, _cell(end), _cell(parts)]) + " |" for arm, other, n, end, parts in rows]
    return "\n".join(lines)


def write_outputs(
    study: Study, runs: dict[str, dict[int, dict]], rows: list[dict[str, Any]], out: Path, command: str
) -> str:
    out.mkdir(parents=True, exist_ok=True)
    md = f"{table(study, rows)}\n\nCommand: `{command}`\n"
    (out / "table.md").write_text(md)
    kept = {arm: {str(seed): runs[arm][seed] for seed in sorted(runs[arm])} for arm in runs}
    results = {"study": asdict(study), "rows": rows, "runs": kept}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    figure(study, rows, out / "figure.png")
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", choices=sorted(STUDIES), help="a built-in study")
    p.add_argument("--spec", type=Path, help="a study of your own, as JSON (see --show)")
    p.add_argument("--quick", action="store_true", help="the reduced version: the direction, in minutes")
    p.add_argument("--seeds", help='override the study\'s seeds ("0,1,2" or "0-3")')
    p.add_argument("--arms", help="only these arms, comma-separated (the baseline is always kept)")
    p.add_argument("--base-lr", type=float, help="the LR of every arm that sets none; the study is renamed NAME-lrLR")
    p.add_argument("--show", action="store_true", help="print the study as JSON and run nothing")
    p.add_argument("--pool", nargs="+", type=Path, metavar="RESULTS", help="pool the contrasts of these results.json")
    p.add_argument("--finished-only", action="store_true", help="tables from the runs finished so far; train nothing")
    p.add_argument("--out", type=Path, default=Path("docs/study"))
    p.add_argument("--storage-path", type=Path, default=Path("runs/study"))
    args = p.parse_args(argv)
    try:
        if args.pool:
            print(pooled_contrasts([_read_results(path) for path in args.pool]))
            return 0
        if (args.name is None) == (args.spec is None):
            raise ConfigError("name one built-in study or give --spec FILE, not both")
        study = load_study(args.spec) if args.spec else STUDIES[args.name](args.quick)
        if args.quick and args.spec is None:
            study.name += "-quick"
        if args.base_lr is not None:
            rebase_lr(study, args.base_lr)
        study.check()
        whole = replace(study)  # what the outputs cover: every arm, every seed finished
        if args.seeds:
            study.seeds = parse_seeds(args.seeds)
        if args.arms:
            keep_arms(study, args.arms.split(","))
        if args.show:
            print(json.dumps(asdict(study), indent=1))
            return 0
        out = args.out / study.name
        published = published_runs(out / "results.json")
        # the tables of the whole study, this command's runs among the rest: narrowing
        # what is trained (--arms, --seeds) never drops a published run
        known = {seed for per_seed in published.values() for seed in per_seed}
        whole.seeds = sorted(set(whole.seeds) | set(study.seeds) | known)
        runs = run_study(whole, args.storage_path, published, train=None if args.finished_only else study)
    except RaylocalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    command = "python scripts/study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(write_outputs(whole, runs, analyse(whole, runs), out, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
