"""Bad SFT input: a DataError naming file, row and field, or with on_bad_row='skip' a logged count."""

from __future__ import annotations

import copy
import json

import pytest
from mlflow.utils.validation import _validate_metric_name

from synpref.core.errors import DataError
from synpref.data import SmolTalkDataModule
from synpref.modules.base import DROPPED_PREFIX
from tests.conftest import read_jsonl


@pytest.fixture(scope="module")
def good(sample_dir) -> list[dict]:
    return read_jsonl(sample_dir / "sft_messages.jsonl")[:6]


def broken(row: dict, case: str) -> tuple[dict, str]:
    """A real row broken one way, and the field the error must name."""
    row = copy.deepcopy(row)
    if case == "no messages":
        del row["messages"]
        return row, "messages"
    if case == "unknown role":
        row["messages"][0]["role"] = "human"
        return row, "messages[0].role"
    if case == "empty content":
        row["messages"][1]["content"] = "  "
        return row, "messages[1].content"
    if case == "no assistant turn":
        row["messages"] = row["messages"][:1]
        return row, "messages"
    raise ValueError(case)


CASES = ["no messages", "unknown role", "empty content", "no assistant turn"]


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def setup(tiny_model, path, **kwargs) -> SmolTalkDataModule:
    dm = SmolTalkDataModule(tiny_model, path=path, max_length=1024, batch_size=2, **kwargs)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("case", CASES)
def test_bad_row_raises_located_error(tiny_model, good, tmp_path, case):
    bad, field = broken(good[2], case)
    path = write(tmp_path / "sft.jsonl", [good[0], good[1], bad, good[3]])
    with pytest.raises(DataError) as e:
        setup(tiny_model, path)
    assert (e.value.source, e.value.row, e.value.field) == (path, 2, field)
    assert str(e.value).startswith(f"{path}: row 2: field {field!r}: ")


def test_bad_rows_skipped_are_counted_and_logged(tiny_model, good, tmp_path, caplog):
    rows, expected = list(good), {}
    for i, case in enumerate(CASES):
        bad, field = broken(good[i], case)
        rows.insert(2 * i + 1, bad)  # bad rows at 1, 3, 5, 7
        key = "train/bad/" + field.replace("[0]", "").replace("[1]", "")
        expected[key] = expected.get(key, 0) + 1
    path = write(tmp_path / "sft.jsonl", rows)
    with caplog.at_level("WARNING"):
        dm = setup(tiny_model, path, on_bad_row="skip")
    assert dm.drop_counts == expected
    assert expected == {"train/bad/messages": 2, "train/bad/messages.role": 1, "train/bad/messages.content": 1}
    assert len(dm.train_set) == len(good)
    # Each skipped row is logged with its file, row and field; then the counts.
    for i, case in enumerate(CASES):
        assert f"{path}: row {2 * i + 1}: field {broken(good[i], case)[1]!r}" in caplog.text
    assert f"kept {len(good)} of {len(rows)}" in caplog.text

    # The counts become run metrics (CausalLMModule.on_fit_start): names MLflow accepts.
    for key in dm.drop_counts:
        _validate_metric_name(DROPPED_PREFIX + key)


def test_all_rows_bad_is_an_error_even_when_skipping(tiny_model, good, tmp_path):
    path = write(tmp_path / "sft.jsonl", [broken(r, "no assistant turn")[0] for r in good[:3]])
    with pytest.raises(DataError, match="no usable conversations"):
        setup(tiny_model, path, on_bad_row="skip")


def test_error_is_located_with_several_processes(tiny_model, good, tmp_path):
    bad, field = broken(good[4], "unknown role")
    path = write(tmp_path / "sft.jsonl", [*good[:4], bad, good[5]])
    with pytest.raises(DataError) as e:
        setup(tiny_model, path, num_proc=2)
    assert (e.value.source, e.value.row, e.value.field) == (path, 4, field)


def test_missing_path(tiny_model, tmp_path):
    path = str(tmp_path / "nowhere" / "sft.jsonl")
    with pytest.raises(DataError) as e:
        setup(tiny_model, path)
    assert e.value.source == path and e.value.field == "path" and "does not exist" in str(e.value)
    assert str(e.value).startswith(path)


def test_invalid_json_line_is_located(tiny_model, good, tmp_path):
    path = tmp_path / "sft.jsonl"
    lines = [json.dumps(r) for r in good[:3]]
    lines[1] = lines[1][:-20]  # a line cut short, as by an interrupted write
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        setup(tiny_model, str(path))
    assert (e.value.source, e.value.row) == (str(path), 1) and "not valid JSON" in str(e.value)


def test_one_process_tokenizes_in_this_one(tiny_model, good, tmp_path, monkeypatch):
    """num_proc=1 maps in this process: datasets >= 4 would fork a pool of one (seconds a stage)."""
    import datasets.arrow_dataset

    def no_pool(*args, **kwargs):
        raise AssertionError("a process pool for num_proc=1")

    monkeypatch.setattr(datasets.arrow_dataset.mp, "Pool", no_pool)
    data = setup(tiny_model, write(tmp_path / "sft.jsonl", good), num_proc=1)
    assert len(data.train_set) + len(data.val_set or []) == len(good)
