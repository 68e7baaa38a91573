"""The evaluation text's fetch: a machine without the Debian archive gets a clear error."""

import subprocess

import pytest

from vllm_turboquant import textdata


def test_failed_fetch_names_the_file_to_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_TURBOQUANT_CACHE", str(tmp_path))

    def no_archive(cmd, **kw):  # apt-get download and apt-get update both fail
        return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package")

    monkeypatch.setattr(textdata.subprocess, "run", no_archive)
    with pytest.raises(RuntimeError, match="austen.txt") as err:
        textdata.ensure_english_text()
    assert "Unable to locate package" in str(err.value)


def test_cached_text_is_used_without_a_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_TURBOQUANT_CACHE", str(tmp_path))
    cached = tmp_path / "text" / "austen.txt"
    cached.parent.mkdir()
    cached.write_text("It is a truth universally acknowledged")

    def must_not_run(cmd, **kw):
        raise AssertionError(f"fetched although the text is cached: {cmd}")

    monkeypatch.setattr(textdata.subprocess, "run", must_not_run)
    assert textdata.ensure_english_text() == cached
