"""raylocal/tools/config_path.py: the config's path through the modules, counted."""

from __future__ import annotations

from raylocal.tools import config_path


def test_the_path_counts_stops_repeat_visits_and_climbs_back_by_hand():
    calls = [("run.launch", "run"), ("run.run", "__init__"), ("run.run", "execute"), ("core.runlog", "dir"),
             ("run.run", "_phases"), ("run.async_run", "__init__"), ("cluster.preflight", "check_run"),
             ("run.async_run", "run"), ("cluster.preflight", "again")]  # fmt: skip
    path = config_path.stops(calls)
    assert path == ["run.launch", "run.run", "core.runlog", "run.run", "run.async_run", "cluster.preflight",
                    "run.async_run", "cluster.preflight"]  # fmt: skip
    assert config_path.visits(path) == {"run.run": 2, "run.async_run": 2, "cluster.preflight": 2}
    assert config_path.climbs(path) == 3  # back to run.run, run.async_run and cluster.preflight
    assert config_path.climbs(["a", "b", "c"]) == 0 and config_path.visits(["a", "b", "c"]) == {}
