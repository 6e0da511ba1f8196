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
import sys
from dataclasses import asdict, replace
from pathlib import Path

from raylocal.errors import ConfigError, RaylocalError
from raylocal.study.catalog import STUDIES
from raylocal.study.compare import parse_seeds
from raylocal.study.recheck import recheck_tables
from raylocal.study.runner import _read_results, published_runs, run_study
from raylocal.study.spec import keep_arms, load_study, rebase_lr
from raylocal.study.tables import analyse, pooled_contrasts, write_outputs


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
    p.add_argument(
        "--recheck", nargs="+", type=Path, metavar="RESULTS",
        help="the end-of-run comparisons of studies published without run records, Holm-adjusted over them all",
    )  # fmt: skip
    p.add_argument("--finished-only", action="store_true", help="tables from the runs finished so far; train nothing")
    p.add_argument("--out", type=Path, default=Path("docs/study"))
    p.add_argument("--storage-path", type=Path, default=Path("runs/study"))
    args = p.parse_args(argv)
    # absolute from the start: a run on Ray leaves this process standing in its own
    # directory when the one it came from is gone (under `ray job submit`)
    args.out, args.storage_path = args.out.resolve(), args.storage_path.resolve()
    try:
        if args.pool:
            print(pooled_contrasts([_read_results(path) for path in args.pool]))
            return 0
        if args.recheck:
            print(recheck_tables([_read_results(path) for path in args.recheck]))
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
