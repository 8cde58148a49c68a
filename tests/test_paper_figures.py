"""Every registered figure runs at tiny scale, writes non-empty PNG + PDF, and the manifest lists exactly them."""

import json
import os

import numpy as np
import pytest

from paper_figures import FIGURES
from paper_figures.__main__ import main


@pytest.fixture(scope="module")
def tiny_output(tmp_path_factory):
    output = tmp_path_factory.mktemp("figures")
    assert main(["--scale", "tiny", "--device", "cpu", "--output", str(output)]) == 0
    return output


@pytest.mark.parametrize("name", list(FIGURES))
def test_figure_files_exist_and_are_not_empty(tiny_output, name):
    for extension in ("png", "pdf"):
        path = tiny_output / f"{name}.{extension}"
        assert path.stat().st_size > 1000, f"{path} is empty or tiny"


def test_manifest_lists_exactly_the_figures(tiny_output):
    manifest = json.loads((tiny_output / "manifest.json").read_text())
    assert [entry["name"] for entry in manifest["figures"]] == list(FIGURES)
    produced = sorted(p for p in os.listdir(tiny_output) if p.endswith((".png", ".pdf")))
    listed = sorted(f for entry in manifest["figures"] for f in entry["files"])
    assert produced == listed
    assert manifest["package_version"] and all(entry["config"] for entry in manifest["figures"])


TIMING_KEYS = {"created", "wall_seconds", "runtime_s"}


def without_timings(document):
    """The document without wall-clock fields, which legitimately differ between runs."""
    if isinstance(document, dict):
        return {k: without_timings(v) for k, v in document.items() if k not in TIMING_KEYS}
    if isinstance(document, list):
        return [without_timings(v) for v in document]
    return document


def test_recompute_with_same_seed_gives_identical_cache(tiny_output, tmp_path):
    assert main(["--scale", "tiny", "--device", "cpu", "--output", str(tmp_path), "--recompute"]) == 0
    caches = sorted(p.name for p in (tiny_output / "cache").iterdir())
    assert caches == sorted(p.name for p in (tmp_path / "cache").iterdir())
    for name in caches:
        first, second = tiny_output / "cache" / name, tmp_path / "cache" / name
        if name.endswith(".json"):
            documents = [without_timings(json.loads(path.read_text())) for path in (first, second)]
            assert documents[0] == documents[1], name
        else:
            with np.load(first) as a, np.load(second) as b:
                assert sorted(a.files) == sorted(b.files), name
                for key in a.files:
                    np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}:{key}")


def test_cache_is_reused_unless_recompute(tmp_path):
    name = next(iter(FIGURES))
    arguments = ["--scale", "tiny", "--device", "cpu", "--output", str(tmp_path), "--only", name]
    main(arguments)
    main(arguments)
    assert json.loads((tmp_path / "manifest.json").read_text())["figures"][0]["reused_cache"] is True
    main(arguments + ["--recompute"])
    assert json.loads((tmp_path / "manifest.json").read_text())["figures"][0]["reused_cache"] is False


def test_unknown_figure_is_rejected():
    with pytest.raises(SystemExit):
        main(["--only", "no_such_figure"])
