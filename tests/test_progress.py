"""markovsim.progress: a tqdm bar on a terminal, a bounded number of plain lines otherwise (llm re-exports it)."""

from __future__ import annotations

import io

from markovsim.progress import PlainProgress, progress_bar, progress_iter


def test_progress_off_a_terminal_is_a_few_plain_lines():
    stream = io.StringIO()
    bar = progress_bar(50, 0, "unlearn npo", enabled=True, stream=stream)
    assert isinstance(bar, PlainProgress)
    for _ in range(50):
        bar.update(1)
        bar.set_postfix(loss="1.2345", refresh=False)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and 5 <= len(lines) <= 11
    assert lines[-1] == "unlearn npo: step 50/50 loss=1.2345"
    silent = io.StringIO()
    progress_bar(50, 0, "x", enabled=False, stream=silent).update(50)
    assert silent.getvalue() == ""


def test_progress_iter_yields_every_item_and_counts_them_in_plain_lines():
    stream = io.StringIO()
    assert list(progress_iter(iter(range(1000)), 1000, "run sets", stream=stream, unit="run set")) == list(range(1000))
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) <= 11 and lines[-1] == "run sets: run set 1000/1000"


def test_one_implementation_for_the_simulator_and_llm():
    import llm.progress
    import markovsim.dynamics

    assert llm.progress.progress_bar is progress_bar
    assert markovsim.dynamics.progress_bar is progress_bar
