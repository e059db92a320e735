"""Preference data: every format gives the same tokens as encode_prompt_response; ties, mixtures, bad input."""

from __future__ import annotations

import json

import pytest

from synpref.core.chat import IGNORE_INDEX, encode_prompt_response
from synpref.core.errors import DataError
from synpref.core.models import load_tokenizer
from synpref.data.preferences import PreferenceDataModule, PreferenceSource
from tests.conftest import read_jsonl


@pytest.fixture(scope="module")
def rows(sample_dir):
    return read_jsonl(sample_dir / "train_prefs.jsonl")[:40]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def module(tiny_model, *sources, **kw):
    kw.setdefault("max_length", 4096)  # no truncation unless a test asks
    dm = PreferenceDataModule(tiny_model, [PreferenceSource(**s) for s in sources], **kw)
    dm.setup("fit")
    return dm


def clean(rows):
    """Rows with a real preference: distinct non-empty replies and unequal scores."""
    return [
        r
        for r in rows
        if r["score_chosen"] != r["score_rejected"]
        and r["chosen"][-1]["content"] != r["rejected"][-1]["content"]
        and r["chosen"][-1]["content"].strip()
        and r["rejected"][-1]["content"].strip()
    ]


def test_ultrafeedback_tokens_ties_and_ids(tiny_model, sample_dir, rows, tmp_path):
    path = write(tmp_path / "uf.jsonl", rows)
    dm = module(tiny_model, {"path": path, "format": "ultrafeedback_binarized"}, on_bad_row="skip", max_length=512)
    tok = dm.tokenizer
    expected, truncated = [], 0
    for r in clean(rows):
        p, c = encode_prompt_response(tok, r["chosen"][:-1], r["chosen"][-1]["content"])
        _, rj = encode_prompt_response(tok, r["rejected"][:-1], r["rejected"][-1]["content"])
        if len(p) >= 512:
            truncated += 1
        else:
            expected.append((p, c[: 512 - len(p)], rj[: 512 - len(p)]))
    ties = sum(r["score_chosen"] == r["score_rejected"] for r in rows)
    assert ties > 0 and dm.drop_counts["train/tie"] == ties
    assert truncated > 0 and dm.drop_counts["train/truncated"] == truncated
    assert dm.train_set["index"] == list(range(len(expected)))
    got = list(zip(dm.train_set["prompt_ids"], dm.train_set["chosen_ids"], dm.train_set["rejected_ids"]))
    assert got == expected


def test_synpref_and_trl_formats_match_ultrafeedback(tiny_model, rows, tmp_path):
    good = clean(rows)[:12]
    synpref = [
        {
            "prompt": r["chosen"][:-1],
            "chosen": r["chosen"][-1:],
            "rejected": r["rejected"][-1:],
            "score_chosen": r["score_chosen"],
            "score_rejected": r["score_rejected"],
            "prompt_id": r["prompt_id"],
        }
        for r in good
    ]
    strings = [
        {
            "prompt": r["chosen"][0]["content"],
            "chosen": r["chosen"][-1]["content"],
            "rejected": r["rejected"][-1]["content"],
        }
        for r in good
    ]
    implicit = [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in good]
    ref = module(
        tiny_model, {"path": write(tmp_path / "uf.jsonl", good), "format": "ultrafeedback_binarized"}
    ).train_set
    for name, data, fmt in [("syn", synpref, "synpref"), ("str", strings, "trl"), ("imp", implicit, "trl")]:
        got = module(tiny_model, {"path": write(tmp_path / f"{name}.jsonl", data), "format": fmt}).train_set
        for col in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert got[col] == ref[col], (name, col)


def test_openbmb_binarization(tiny_model, rows, tmp_path):
    good = clean(rows)[:6]
    bmb = [
        {
            "instruction": r["chosen"][0]["content"],
            "completions": [
                {"response": r["rejected"][-1]["content"], "overall_score": 2.0},
                {"response": r["chosen"][-1]["content"], "overall_score": 9.0},
                {"response": good[(i + 1) % 6]["chosen"][-1]["content"], "overall_score": 1.0},
                {"response": good[(i + 2) % 6]["chosen"][-1]["content"], "overall_score": 5.0},
            ],
        }
        for i, r in enumerate(good)
    ]
    path = write(tmp_path / "bmb.jsonl", bmb)
    lowest = module(tiny_model, {"path": path, "format": "openbmb", "binarize": "lowest"}).train_set
    rand = module(tiny_model, {"path": path, "format": "openbmb"}).train_set
    tok = load_tokenizer(tiny_model)
    for i, r in enumerate(good):
        prompt = r["chosen"][:1]
        assert lowest[i]["chosen_ids"] == encode_prompt_response(tok, prompt, r["chosen"][-1]["content"])[1]
        worst = encode_prompt_response(tok, prompt, good[(i + 1) % 6]["chosen"][-1]["content"])[1]
        assert lowest[i]["rejected_ids"] == worst
        others = [
            encode_prompt_response(tok, prompt, c["response"])[1]
            for c in bmb[i]["completions"]
            if c["overall_score"] != 9.0
        ]
        assert rand[i]["chosen_ids"] == lowest[i]["chosen_ids"] and rand[i]["rejected_ids"] in others
    # Seeded: the same draw every time, and not always the lowest.
    assert rand["rejected_ids"] != lowest["rejected_ids"]
    assert rand["rejected_ids"] == module(tiny_model, {"path": path, "format": "openbmb"}).train_set["rejected_ids"]


def test_mixture_is_one_config_line(tiny_model, rows, tmp_path):
    good = clean(rows)
    uf = {"path": write(tmp_path / "uf.jsonl", good[:20]), "format": "ultrafeedback_binarized"}
    syn = {
        "path": write(
            tmp_path / "syn.jsonl",
            [
                {
                    "prompt": r["chosen"][:-1],
                    "chosen": r["chosen"][-1:],
                    "rejected": r["rejected"][-1:],
                    "score_chosen": 1,
                    "score_rejected": 0,
                }
                for r in good[20:30]
            ],
        ),
        "format": "synpref",
    }
    assert len(module(tiny_model, syn).train_set) == 10
    both = module(tiny_model, uf, syn).train_set
    assert len(both) == 30 and both["index"] == list(range(30))
    weighted = module(tiny_model, {**uf, "weight": 0.5}, {**syn, "weight": 2.0}).train_set
    assert len(weighted) == 10 + 20
    assert weighted["chosen_ids"][10:20] == weighted["chosen_ids"][20:30]  # the synthetic pairs, twice


def test_collate_concatenates_chosen_then_rejected(tiny_model, rows, tmp_path):
    dm = module(
        tiny_model, {"path": write(tmp_path / "uf.jsonl", clean(rows)[:3]), "format": "ultrafeedback_binarized"}
    )
    items = [dm.train_set[i] for i in range(3)]
    batch = dm.collate(items)
    assert batch["input_ids"].shape[0] == 6 and batch["index"].tolist() == [0, 1, 2]
    for k, (r, key) in enumerate([(r, "chosen_ids") for r in items] + [(r, "rejected_ids") for r in items]):
        n = len(r["prompt_ids"]) + len(r[key])
        assert batch["input_ids"][k, :n].tolist() == r["prompt_ids"] + r[key]
        assert batch["attention_mask"][k].sum() == n
        labelled = [t for t in batch["labels"][k].tolist() if t != IGNORE_INDEX]
        assert labelled == r[key]


def _bad(r):
    c, rj = r["chosen"], r["rejected"]
    other = [{"role": "user", "content": "another question"}] + rj[-1:]
    return {
        "missing chosen": ({"prompt": r["prompt"], "rejected": rj}, "chosen"),
        "identical": ({"chosen": c, "rejected": c[:-1] + [dict(c[-1])]}, "rejected"),
        "different prompts": ({"chosen": c, "rejected": other}, "rejected"),
        "empty response": (
            {"chosen": c[:-1] + [{"role": "assistant", "content": " "}], "rejected": rj},
            "chosen[1].content",
        ),
    }


@pytest.mark.parametrize("case", ["missing chosen", "identical", "different prompts", "empty response"])
def test_bad_rows_error_or_counted_skip(tiny_model, rows, tmp_path, case):
    good = clean(rows)[:3]
    bad, field = _bad(good[0])[case]
    path = write(tmp_path / "bad.jsonl", [good[1], bad, good[2]])
    with pytest.raises(DataError) as e:
        module(tiny_model, {"path": path, "format": "trl"})
    assert (e.value.source, e.value.row, e.value.field) == (path, 1, field)
    dm = module(tiny_model, {"path": path, "format": "trl"}, on_bad_row="skip")
    assert len(dm.train_set) == 2 and sum(dm.drop_counts.values()) == 1


def test_truncated_away_is_counted(tiny_model, rows, tmp_path):
    good = clean(rows)[:8]
    dm = module(
        tiny_model, {"path": write(tmp_path / "uf.jsonl", good), "format": "ultrafeedback_binarized"}, max_length=64
    )
    tok = dm.tokenizer
    prompt_lens = [len(encode_prompt_response(tok, r["chosen"][:-1], "x")[0]) for r in good]
    assert dm.drop_counts.get("train/truncated", 0) == sum(n >= 64 for n in prompt_lens) > 0
    for r in dm.train_set:
        assert len(r["prompt_ids"]) + len(r["chosen_ids"]) <= 64 and len(r["chosen_ids"]) > 0
