"""A build that starts a Dask cluster (or joins one) says where its dashboard is, once, on stderr; without bokeh
(the dashboard's optional dependency) it says so in one line instead of printing a link to a page that is not
there."""

from __future__ import annotations

import sys
import types

import pytest

from cmsrd.driver import _open_client


def _open(capsys) -> tuple[list[str], str]:
    client, cluster = _open_client(1, 1, None, processes=False)  # threads: the scheduler runs in this process
    try:
        link = client.dashboard_link
    finally:
        client.close()
        cluster.close()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("dask dashboard:")]
    return lines, link


def test_the_dashboard_link_is_printed_once_when_the_scheduler_serves_it(capsys, monkeypatch):
    # what distributed imports when the scheduler's dashboard started (bokeh present)
    monkeypatch.setitem(sys.modules, "distributed.dashboard.scheduler", types.ModuleType("fake"))
    lines, link = _open(capsys)
    assert lines == [f"dask dashboard: {link}"] and link.startswith("http://") and link.endswith("/status")


def test_without_bokeh_one_line_says_there_is_no_dashboard(capsys):
    import importlib.util

    if importlib.util.find_spec("bokeh") is not None:
        pytest.skip("bokeh is installed: the dashboard starts")
    lines, _ = _open(capsys)
    assert lines == ["dask dashboard: none (needs bokeh on the scheduler)"]
