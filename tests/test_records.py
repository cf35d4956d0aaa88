"""Atomic result writes: a failed write leaves the previous file whole and no temporary files behind."""

import json
import os

import pytest

from anllm_jax import records


def test_write_json_replaces_whole_file_and_failed_write_keeps_old(tmp_path):
    path = tmp_path / "sub" / "results.json"
    records.write_json(path, {"a": 1})
    records.write_json(path, {"b": [1, 2]})
    assert json.loads(path.read_text()) == {"b": [1, 2]}
    with pytest.raises(TypeError):
        records.write_json(path, {"c": object()})
    assert json.loads(path.read_text()) == {"b": [1, 2]}
    assert os.listdir(path.parent) == ["results.json"]


def test_write_text_crash_before_rename_keeps_old(tmp_path, monkeypatch):
    path = tmp_path / "results.md"
    records.write_text(path, "old")

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(records.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        records.write_text(path, "new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["results.md"]


def test_commit_and_hardware_name_something():
    assert records.commit()
    assert records.hardware().startswith(("cpu", "gpu", "tpu", "cuda", "rocm"))
