#!/usr/bin/env python
"""Search per-part learning rates of the async trainer with Ray Tune (ASHA or PBT).

    python scripts/tune_lr.py --space tune_spaces/independent.py --parts 3 --trials 8
    python scripts/tune_lr.py --space tune_spaces/independent.py --parts 3 --trials 4 --scheduler pbt

Every option of scripts/run_async.py applies to the trials (model, data, epochs,
--config FILE, ...). Writes, under --storage-path/<study>: Tune's own logs
(TensorBoard-readable), ranking.md (the trials, best first) and best.json, a
config that `python scripts/run_async.py --config .../best.json` accepts
unchanged. --resume continues an interrupted study. With --scheduler pbt every
report carries the parts' checkpoints and weak trials continue from strong
ones with perturbed LRs; best.json then holds the best trial's final LRs and
Tune's pbt_policy_*.txt files the schedule that led there.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from raylocal.cluster.connect import connect, standing_in
from raylocal.core.config import EMBEDDED_DEFAULT as DEFAULTS
from raylocal.core.config import RaylocalConfig, build_parser, config_from_args
from raylocal.errors import RaylocalError
from raylocal.run.launch import Loaded, load_data, set_threads
from raylocal.tune.tuning import (
    check_resumable,
    check_study,
    ranked_table,
    read_space,
    study_settings,
    tune_study,
    write_best_config,
)

INTEGER_OPTIONS = ("trials", "report_every", "max_concurrent", "pbt_interval")


def study_options(extra: dict[str, str | None]) -> dict[str, int | None]:
    """The study's integer options, checked (--max-concurrent may be left out)."""
    counts = ("trials", "report_every", "pbt_interval")
    try:
        values: dict[str, int | None] = {k: int(extra[k]) for k in counts}  # type: ignore[arg-type]
        values["max_concurrent"] = int(extra["max_concurrent"]) if extra["max_concurrent"] else None
    except ValueError as e:
        raise RaylocalError(
            f"--trials, --report-every, --max-concurrent and --pbt-interval take integers ({e})"
        ) from None
    if any(values[k] < 1 for k in counts):  # type: ignore[operator]
        raise RaylocalError("--trials, --report-every and --pbt-interval must be at least 1")
    return values


def report(results: object, base: RaylocalConfig, out: Path) -> None:
    """The ranking (ranking.md), the best trial's config (best.json) and where they are;
    nothing when a trial failed with an error (Tune keeps going without it) or the
    study was interrupted."""
    errors = results.errors  # type: ignore[attr-defined]
    if errors:
        first = (str(errors[0]).strip().splitlines() or [type(errors[0]).__name__])[-1]
        raise RaylocalError(f"{len(errors)} trial(s) failed, the first: {first[:200]}; see {out}")
    # Ctrl-C ends Tune's fit() normally: its unfinished trials would be ranked as if done
    trials = results._experiment_analysis.trials  # type: ignore[attr-defined]  # (no public trial status)
    unfinished = [t for t in trials if t.status not in ("TERMINATED", "ERROR")]
    if unfinished:
        raise RaylocalError(
            f"the study stopped before {len(unfinished)} of its {len(trials)} trials ended; nothing is ranked: "
            "continue it with --resume"
        )
    table, rows = ranked_table(results, base.part_count())
    (out / "ranking.md").write_text(table + "\n")
    print(table)
    ok = [r for r in rows if not r["diverged"]]
    if not ok:
        raise RaylocalError(f"every trial diverged; see {out}")
    write_best_config(base, ok[0], out / "best.json")
    print(f"\nbest: LRs {ok[0]['lrs']}, test BPD {ok[0]['test_bpd']:.4f}")
    finetune = base.schedule.finetune_epochs
    if finetune:  # (the trials rank LRs for the parts; a run with them fine-tunes as asked)
        print(f"the trials ran their parts only; best.json keeps your fine-tune of {finetune} epoch(s)")
    print(f"config: {out / 'best.json'}  (python scripts/run_async.py --config {out / 'best.json'})")
    print(f"Tune logs: {out}")


def main(argv: list[str] | None = None, loaded: Loaded | None = None) -> int:
    """The command; ``loaded``: images its caller read already, by data source
    (a study reads every input before its first run joins Ray)."""
    defaults = {**DEFAULTS, "samples": 0, "progress": False}
    parser = build_parser(__doc__, defaults)
    parser.add_argument("--space", required=True, help="tune_spaces/<name>.py")
    parser.add_argument("--trials", default="4", help="trials to sample (grid spaces run each point once)")
    parser.add_argument("--report-every", default="50", help="steps between evaluations reported to Tune")
    parser.add_argument("--study", default=None, help="study name (default: tune-<space>-<parts>p)")
    parser.add_argument("--max-concurrent", default=None, help="most trials at once (default: as resources allow)")
    parser.add_argument("--scheduler", default="asha", help="asha (early stopping) or pbt (population based training)")
    parser.add_argument("--pbt-interval", default="2", help="reports between PBT's exploit/explore steps")
    try:
        args = parser.parse_args(argv)
        extra = {k: vars(args).pop(k, None) for k in ("space", "study", "scheduler", *INTEGER_OPTIONS)}
        resume = bool(vars(args).pop("resume", False))
        base = config_from_args(args, defaults)
        numbers = study_options(extra)
        space_path, scheduler = extra["space"], extra["scheduler"]
        space = read_space(space_path)  # read once, here: the trials build it from this text
        # a bad space, scheduler or schedule fails here, before Ray starts
        check_study(space, base.part_count(), scheduler, base.schedule.name)
        set_threads(base)
        data = load_data(base, loaded)
        name = extra["study"] or f"tune-{Path(space_path).stem}-{base.part_count()}p"
        storage = Path(base.run.storage_path).resolve()
        settings = study_settings(base, space, scheduler, numbers)
        resumed = check_resumable(storage / name, settings) if resume else None
        storage.mkdir(parents=True, exist_ok=True)
        with standing_in(storage):  # (once joined, the job's own directory may be gone)
            connect(base)
            results = tune_study(
                base, data, space, numbers["trials"], numbers["report_every"], storage, name, resumed,
                numbers["max_concurrent"], scheduler=scheduler, pbt_interval=numbers["pbt_interval"],
                settings=settings,
            )  # fmt: skip
        report(results, base, storage / name)
    except RaylocalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_AUTH_MODE", os.environ.get("RAY_AUTH_MODE", "token"))
    sys.exit(main())
