"""Replies side by side: every arm's reply beside the baseline's on the same prompts, each judge's verdict, disagreements first."""

from __future__ import annotations

import json
import tempfile
import textwrap
from pathlib import Path

from synpref.core.chat import last_user_message
from synpref.reporting.report import judge_label

# The merged table's name on a pipeline's parent run (an MLflow table: `mlflow.load_table`).
REPLIES_TABLE = "replies.json"


def run_records(client, run_id: str) -> list[dict]:
    """An eval run's records (its `eval.jsonl` artifact; [] when it logged none)."""
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = Path(client.download_artifacts(run_id, "eval.jsonl", tmp))
        except (MlflowException, OSError):
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def replies(client, rows: list[dict]) -> tuple[list[dict], dict[str, list]]:
    """The rows whose runs logged their records, and those records merged (merge_replies)."""
    records = {r["model"]: run_records(client, r["run_id"]) for r in rows}
    kept = [r for r in rows if records[r["model"]]]
    return kept, merge_replies(kept, records)


def merge_replies(rows: list[dict], records: dict[str, list[dict]]) -> dict[str, list]:
    """One row per prompt (and sample) that every arm answered: the prompt, the baseline's reply,
    then per arm its reply and each judge's outcome against the baseline (`win`, `tie`, `loss`;
    `–` for no verdict), and the lengths. The baseline's reply is the first arm's; `same_baseline`
    says whether every arm faced that same reply (the same seeds make it so in a pipeline)."""
    arms = [r["model"] for r in rows]
    primary = {r["model"]: judge_label(r.get("reward_model", "")) for r in rows}
    keyed = {arm: {(x["index"], x.get("sample", 0)): x for x in records[arm]} for arm in arms}
    keys = sorted(set.intersection(*(set(k) for k in keyed.values()))) if arms else []
    baseline = rows[0]["baseline"] if rows else "baseline"
    labels = {
        arm: list(dict.fromkeys(k for x in records[arm] for k in (x.get("judges") or {primary[arm]: 0})))
        for arm in arms
    }
    columns: dict[str, list] = {"index": [], "prompt": [], baseline: []}
    for arm in arms:
        columns[arm] = []
        columns.update({f"{arm}/{label}": [] for label in labels[arm]})
    columns.update({f"{baseline}/length": [], **{f"{arm}/length": [] for arm in arms}, "same_baseline": []})
    for key in keys:
        first = keyed[arms[0]][key]
        columns["index"].append(key[0])
        columns["prompt"].append(last_user_message(first["prompt"]))
        columns[baseline].append(first["baseline_response"])
        columns[f"{baseline}/length"].append(first.get("baseline_length"))
        for arm in arms:
            x = keyed[arm][key]
            columns[arm].append(x["policy_response"])
            columns[f"{arm}/length"].append(x.get("policy_length"))
            judged = x.get("judges") or {primary[arm]: x}
            for label in labels[arm]:
                columns[f"{arm}/{label}"].append((judged.get(label) or {}).get("outcome") or "–")
        columns["same_baseline"].append(
            all(keyed[a][key]["baseline_response"] == first["baseline_response"] for a in arms)
        )
    return columns


def disagreement(columns: dict[str, list], arms: list[str], i: int) -> str:
    """Why row i is worth reading: judges that disagree on an arm, or arms a judge rates differently ('' if none)."""
    verdicts = {
        arm: {k.split("/", 1)[1]: v[i] for k, v in columns.items() if k.startswith(arm + "/") and k != f"{arm}/length"}
        for arm in arms
    }
    reasons = [
        f"judges disagree on {arm}" for arm, v in verdicts.items() if len({o for o in v.values() if o != "–"}) > 1
    ]
    labels = set.intersection(*(set(v) for v in verdicts.values())) if verdicts else set()
    reasons += [
        f"{label} splits the arms"
        for label in sorted(labels)
        if len({verdicts[a][label] for a in arms}) > 1 and len(arms) > 1
    ]
    return "; ".join(reasons)


def show(columns: dict[str, list], rows: list[dict], n: int, width: int = 300) -> str:
    """n prompts as text, those where judges or arms disagree first (in prompt order), then the rest."""
    arms = [r["model"] for r in rows]
    baseline = rows[0]["baseline"] if rows else "baseline"
    why = [disagreement(columns, arms, i) for i in range(len(columns["index"]))]
    chosen = sorted(range(len(why)), key=lambda i: (not why[i], i))[:n]
    cut = lambda text: textwrap.shorten(" ".join(str(text).split()), width, placeholder=" …") or "(empty)"
    out = []
    for i in chosen:
        out.append(f"── prompt {columns['index'][i]}" + (f" ({why[i]})" if why[i] else ""))
        out.append(f"prompt: {cut(columns['prompt'][i])}")
        out.append(f"{baseline}: {cut(columns[baseline][i])}")
        for arm in arms:
            verdicts = ", ".join(
                f"{k.split('/', 1)[1]}: {v[i]}"
                for k, v in columns.items()
                if k.startswith(arm + "/") and k != f"{arm}/length"
            )
            out.append(f"{arm} [{verdicts}]: {cut(columns[arm][i])}")
    return "\n".join(out)
