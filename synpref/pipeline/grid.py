"""Scaling-study grids: variables expanded into arms whose pairs, DPO and evaluation stages share upstream work."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from synpref.core.errors import ConfigError
from synpref.core.losses import LOSSES
from synpref.core.pairs import RULES
from synpref.pipeline.stages import Stage

DATA = ("synthetic", "ultrafeedback", "union")
REFERENCES = ("sft", "previous")
# Every arm has these; a dotted name (`model.init_args.beta`) is a DPO setting of the arm instead.
VARIABLES = {
    "data": "synthetic",
    "k": None,
    "rule": "best_worst",
    "threshold": 0.0,
    "pairs": "all",
    "rounds": 1,
    "reference": "sft",
    "loss": None,  # None: the DPO config's loss; a loss_type name; or kto (every sample, no pairs)
}
# What only synthetic pairs have: an ultrafeedback arm keeps their defaults, whatever a sweep says.
PAIR_SETTINGS = ("k", "rule", "threshold", "pairs")


@dataclass
class Study:
    """A grid of arms over one SFT model and one sampling run (docs/scaling.md).

    Args:
        sft: the shared stage whose export is the SFT model: round 1's DPO init and reference, and
            every arm's evaluation baseline.
        samples: the shared sampling stage whose samples.jsonl round 1 builds its pairs from; it
            must sample K ≥ every arm's k (an arm's k takes the first k samples of each prompt).
        dpo_config: the DPO stage's config files, composed; the arm sets init, reference, data
            sources and export folder.
        eval_config: the evaluation stage's config files; the arm sets policy, baseline, output.
        sample_config: config files of the sampling in rounds ≥ 2 (policy, K, prompt slice set here).
        ultrafeedback: preference file (ultrafeedback_binarized format) of the `ultrafeedback` and
            `union` arms.
        held_out: evaluation prompt files: a pair whose prompt is in one of them is an error.
        root: folder of the arms' pairs, exports, samples and evaluations.
        defaults: each variable's value where a sweep does not set it (VARIABLES: data, k, rule,
            threshold, pairs, rounds, reference; or a dotted DPO setting).
        sweeps: each maps variables to value lists; its arms are their product, the other variables
            at their defaults; the grid is the union of the sweeps (an arm listed twice runs once).
        prompts_per_round: prompts per round in arms with rounds > 1: round r uses the r-th slice of
            that size (round 1 from the shared samples, later rounds sampled afresh).
        head_to_head: arm pairs compared prompt by prompt, each arm as `var=value[,var=value]` over
            the defaults, e.g. ["data=synthetic", "data=ultrafeedback"].
        seed: seed of best_random and of which pairs a `pairs: n` arm keeps.
        dpo_args: command-line overrides for every arm's DPO stage (`--trainer.max_epochs=3`).
        eval_args: ... for every evaluation stage.
        sample_args: ... for every sampling stage of rounds ≥ 2.
        loss_args: per `loss` value, command-line overrides of its arms' DPO stage (SimPO's β and γ).
        kto_config: config files composed after dpo_config for `loss: kto` arms (KTOModule and
            UnpairedDataModule): they train on every sample of the shared sampling run, labelled
            as `kto_labels` says (an UnpairedSource's label_rule and threshold), or on both replies
            of each UltraFeedback pair; pair settings do not apply to them.
    """

    sft: str
    samples: str
    dpo_config: list[str]
    eval_config: list[str]
    sample_config: list[str] = field(default_factory=list)
    ultrafeedback: Optional[str] = None
    held_out: list[str] = field(default_factory=list)
    root: str = "artifacts/scaling"
    defaults: dict[str, Any] = field(default_factory=dict)
    sweeps: list[dict[str, list]] = field(default_factory=list)
    prompts_per_round: Optional[int] = None
    head_to_head: list[list[str]] = field(default_factory=list)
    seed: int = 0
    dpo_args: list[str] = field(default_factory=list)
    eval_args: list[str] = field(default_factory=list)
    sample_args: list[str] = field(default_factory=list)
    loss_args: dict[str, list[str]] = field(default_factory=dict)
    kto_config: list[str] = field(default_factory=list)
    kto_labels: dict[str, Any] = field(default_factory=lambda: {"label_rule": "median"})


@dataclass
class ArmStage:
    """What an arm's stage is for: its MLflow params (`arm.*`) and where the round's pairs are."""

    label: str
    kind: str  # pairs, dpo or eval
    values: dict[str, Any]
    round: int
    pairs_stats: Optional[str] = None  # the round's pairs stats.json (synthetic pair count)

    def params(self) -> dict[str, str]:
        return {f"arm.{k}": str(v) for k, v in {**self.values, "round": self.round, "label": self.label}.items()}


def _whole(value) -> bool:
    return type(value) is int  # YAML's `true` is an int to isinstance, and no count


def _check(arm: dict, where: str) -> None:
    for key in arm:
        if key not in VARIABLES and "." not in key:
            raise ConfigError(
                where, f"unknown variable {key!r}; variables: {', '.join(VARIABLES)} or a dotted DPO setting"
            )
    number = type(arm["threshold"]) in (int, float) and math.isfinite(arm["threshold"])
    checks = [
        ("data", arm["data"] in DATA, f"one of {DATA}"),
        ("rule", arm["rule"] in RULES, f"one of {RULES}"),
        ("reference", arm["reference"] in REFERENCES, f"one of {REFERENCES}"),
        ("k", arm["k"] is None or (_whole(arm["k"]) and arm["k"] >= 2), "an int ≥ 2 or null (all)"),
        ("threshold", number and arm["threshold"] >= 0, "a number ≥ 0"),
        ("pairs", arm["pairs"] == "all" or (_whole(arm["pairs"]) and arm["pairs"] > 0), "an int > 0 or 'all'"),
        ("rounds", _whole(arm["rounds"]) and arm["rounds"] >= 1, "an int ≥ 1"),
        ("rounds", arm["rounds"] == 1 or arm["data"] == "synthetic", "1 unless data is synthetic (rounds sample)"),
        ("loss", arm["loss"] in (None, "kto", *LOSSES), f"null, kto or one of {LOSSES}"),
        ("rounds", arm["rounds"] == 1 or arm["loss"] != "kto", "1 for loss kto (rounds build pairs)"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{where}.{key}", f"must be {expected}, got {arm[key]!r}")


def arms(study: Study) -> list[dict]:
    """Every arm of the grid as {variable: value}, in sweep order, each once."""
    base = {**VARIABLES, **study.defaults}
    _check(base, "study.defaults")
    out: list[dict] = []
    for i, sweep in enumerate(study.sweeps or [{}]):
        for key, values in sweep.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"study.sweeps[{i}].{key}", f"must be a non-empty list of values, got {values!r}")
        for combo in itertools.product(*sweep.values()):
            arm = {**base, **dict(zip(sweep, combo))}
            _check(arm, f"study.sweeps[{i}]")
            if arm["data"] == "ultrafeedback" or arm["loss"] == "kto":  # pair settings do not apply
                arm.update({k: VARIABLES[k] for k in PAIR_SETTINGS})
            if arm not in out:
                out.append(arm)
    if any(a["rounds"] > 1 for a in out) and not (study.prompts_per_round and study.sample_config):
        raise ConfigError("study", "arms with rounds > 1 need prompts_per_round and sample_config")
    if study.prompts_per_round is not None and not (_whole(study.prompts_per_round) and study.prompts_per_round > 0):
        raise ConfigError("study.prompts_per_round", f"must be an int > 0, got {study.prompts_per_round!r}")
    return out


def check_k(arm_stages: dict[str, "ArmStage"], stages: dict[str, Stage], configs: dict[str, dict]) -> None:
    """Each arm's k is at most the K its sampling stage draws (a resolved config's num_samples):
    found before anything runs, not when the pairs stage reads too few samples hours later."""
    for name, arm in arm_stages.items():
        k = arm.values.get("k")
        if arm.kind != "pairs" or not k:
            continue
        for need in stages[name].needs:
            K = configs[need].get("model.init_args.num_samples")
            if K is not None and k > K:
                raise ConfigError(
                    "study",
                    f"arm {arm.label!r} takes k={k} samples per prompt, but stage {need!r} draws "
                    f"K={K}; raise its num_samples or lower k",
                )


def _extras(arm: dict) -> list[str]:
    return [f"{k.rsplit('.', 1)[-1]}{arm[k]}" for k in sorted(arm) if "." in k]


def label(arm: dict, kind: str, r: int = 1) -> str:
    """The part of a stage's name that says which arm settings it depends on (and no others, so
    arms that agree on them share it): `synthetic-k4-best_worst-gap0.1-n50-r2of2-refsft`."""
    parts = [arm["data"]] if kind in ("dpo", "eval") else []
    if arm.get("loss") == "kto":
        return "-".join([*parts, "kto", *_extras(arm)])
    if arm["data"] != "ultrafeedback":
        parts += [f"k{arm['k'] or 'all'}", arm["rule"], f"gap{arm['threshold']:g}", f"n{arm['pairs']}"]
    if kind in ("dpo", "eval") or r >= 2:  # DPO settings shape the policy that later rounds sample from
        parts += ([f"loss{arm['loss']}"] if arm.get("loss") else []) + _extras(arm)
    if arm["rounds"] > 1:
        parts.append(f"r{r}of{arm['rounds']}")
        if r >= (2 if kind in ("dpo", "eval") else 3):  # round r's DPO reference; it shapes round r+1's samples
            parts.append(f"ref{arm['reference']}")
    return "-".join(map(str, parts))


def select(study: Study, spec: str) -> dict:
    """The arm `var=value[,var=value]` names (over the defaults), as arms() writes it."""
    base = {**VARIABLES, **study.defaults}
    for part in filter(None, spec.split(",")):
        key, _, raw = part.partition("=")
        if key.strip() not in base and "." not in key:
            raise ConfigError("study.head_to_head", f"{spec!r}: unknown variable {key.strip()!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw.strip()
        base[key.strip()] = value
    if base["data"] == "ultrafeedback" or base["loss"] == "kto":
        base.update({k: VARIABLES[k] for k in PAIR_SETTINGS})
    return base


def expand(study: Study, shared: list[Stage]) -> tuple[list[Stage], dict[str, ArmStage]]:
    """The arms' stages (after the shared ones, each once) and, per pairs/DPO/eval stage, its arm."""
    by_name = {s.name: s for s in shared}
    for name, role in ((study.sft, "sft"), (study.samples, "samples")):
        if name not in by_name:
            raise ConfigError(f"study.{role}", f"names no stage: {name!r}; the stages are {list(by_name)}")
    sft_dir = by_name[study.sft].outputs[0]
    samples_file = next((o for o in by_name[study.samples].outputs if o.endswith("samples.jsonl")), None)
    if samples_file is None:
        raise ConfigError("study.samples", f"stage {study.samples!r} lists no samples.jsonl among its outputs")
    stages: dict[str, Stage] = {}
    info: dict[str, ArmStage] = {}

    def add(stage: Stage, arm_stage: Optional[ArmStage] = None) -> str:
        if stage.name in stages and stages[stage.name] != stage:
            raise ValueError(f"two different stages would be named {stage.name!r}")  # a bug in label()
        stages.setdefault(stage.name, stage)
        if arm_stage is not None:
            info.setdefault(stage.name, arm_stage)
        return stage.name

    def predict(name: str, config: list[str], args: list[str], needs: list[str], output: str, run_name: str) -> Stage:
        """A `synpref predict` stage over the held-out prompts (sampling or evaluation)."""
        return Stage(name, "predict", list(config), args, needs, list(study.held_out), [output], run_name)

    root, m = study.root.rstrip("/"), study.prompts_per_round
    for arm in arms(study):
        kto = arm["loss"] == "kto"
        no_pairs = arm["data"] == "ultrafeedback" or kto
        # The arm's MLflow params: what applies to it (a null loss is the DPO config's: unchanged params).
        values = {k: v for k, v in arm.items() if not (no_pairs and k in PAIR_SETTINGS) and (k, v) != ("loss", None)}
        policy_stage, policy_dir, earlier_pairs = study.sft, sft_dir, []
        for r in range(1, arm["rounds"] + 1):
            sources, pairs_stage, stats = [], None, None
            if kto and arm["data"] != "ultrafeedback":  # every sample, labelled: no pairs stage
                sources.append({"path": samples_file, "format": "samples", **study.kto_labels})
                pairs_stage = study.samples
            elif arm["data"] != "ultrafeedback":
                samples_stage, samples, first, num = study.samples, samples_file, 0, m if arm["rounds"] > 1 else None
                if r >= 2:
                    out = f"{root}/samples/{label(arm, 'sample', r)}"
                    samples_stage = add(
                        predict(
                            f"sample-{label(arm, 'sample', r)}",
                            study.sample_config,
                            list(study.sample_args)
                            + [
                                f"--model.init_args.policy.name_or_path={policy_dir}",
                                f"--model.init_args.output_dir={out}",
                                f"--data.init_args.skip_prompts={(r - 1) * m}",
                                f"--data.init_args.max_prompts={m}",
                            ]
                            + ([f"--model.init_args.num_samples={arm['k']}"] if arm["k"] else []),
                            [policy_stage],
                            f"{out}/samples.jsonl",
                            f"{label(arm, 'sample', r)}·sample",
                        )
                    )
                    samples, first, num = f"{out}/samples.jsonl", 0, None
                out = f"{root}/pairs/{label(arm, 'pairs', r)}"
                stats = f"{out}/stats.json"
                args = [
                    f"--samples={samples}",
                    f"--output_dir={out}",
                    f"--rule={arm['rule']}",
                    f"--threshold={arm['threshold']}",
                    f"--first_prompt={first}",
                    f"--seed={study.seed}",
                    "--exclude=" + json.dumps(list(study.held_out) + earlier_pairs),
                ]
                args += [f"--k={arm['k']}"] if arm["k"] else []
                args += [f"--max_pairs={arm['pairs']}"] if arm["pairs"] != "all" else []
                args += [f"--num_prompts={num}"] if num else []
                pairs_stage = add(
                    Stage(
                        name=f"pairs-{label(arm, 'pairs', r)}",
                        command="pairs",
                        args=args,
                        needs=[samples_stage],
                        inputs=list(study.held_out) + earlier_pairs,
                        outputs=[f"{out}/pairs.jsonl", stats],
                        run_name=f"{label(arm, 'pairs', r)}·pairs",
                    ),
                    ArmStage(label(arm, "pairs", r), "pairs", values, r, stats),
                )
                earlier_pairs = earlier_pairs + [f"{out}/pairs.jsonl"]
                sources.append({"path": f"{out}/pairs.jsonl", "format": "synpref"})
            if arm["data"] in ("ultrafeedback", "union"):
                if not study.ultrafeedback:
                    raise ConfigError("study.ultrafeedback", f"arms with data: {arm['data']} need the preference file")
                sources.append({"path": study.ultrafeedback, "format": "ultrafeedback_binarized"})
            name, export = label(arm, "dpo", r), f"{root}/dpo/{label(arm, 'dpo', r)}"
            reference = sft_dir if r >= 2 and arm["reference"] == "sft" else None  # None: the init (round 1: SFT)
            dpo = add(
                Stage(
                    name=f"dpo-{name}",
                    command="fit",
                    config=list(study.dpo_config) + (list(study.kto_config) if kto else []),
                    args=list(study.dpo_args)
                    + [
                        f"--model.init_args.policy.name_or_path={policy_dir}",
                        # As a mapping: a dotted `...name_or_path=null` reaches a nested group as 'None'.
                        "--model.init_args.ref_model=" + json.dumps({"name_or_path": reference}),
                        "--data.init_args.sources=" + json.dumps(sources),
                        f"--export.dirpath={export}",
                    ]
                    + ([f"--model.init_args.loss_type={arm['loss']}"] if arm["loss"] and not kto else [])
                    + list(study.loss_args.get(arm["loss"], []))
                    + [
                        f"--{k}={v if isinstance(v, str) else json.dumps(v)}"
                        for k, v in sorted(arm.items())
                        if "." in k
                    ],
                    needs=list(dict.fromkeys([policy_stage, study.sft] + ([pairs_stage] if pairs_stage else []))),
                    inputs=[study.ultrafeedback] if arm["data"] in ("ultrafeedback", "union") else [],
                    outputs=[export],
                    run_name=f"{name}·dpo",
                ),
                ArmStage(name, "dpo", values, r, stats),
            )
            out = f"{root}/eval/{name}"
            add(
                predict(
                    f"eval-{name}",
                    study.eval_config,
                    list(study.eval_args)
                    + [
                        f"--model.init_args.policy.name_or_path={export}",
                        f"--model.init_args.baseline.name_or_path={sft_dir}",
                        f"--model.init_args.output_dir={out}",
                    ],
                    [study.sft, dpo],
                    f"{out}/eval.jsonl",
                    f"{name}·eval",
                ),
                ArmStage(name, "eval", values, r, stats),
            )
            policy_stage, policy_dir = dpo, export
    evaluated = {a.label for a in info.values() if a.kind == "eval"}
    for pair in study.head_to_head:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise ConfigError("study.head_to_head", f"each entry names two arms ('var=value' strings), got {pair!r}")
        for spec in pair:
            arm = select(study, spec)
            _check(arm, "study.head_to_head")
            if label(arm, "eval", arm["rounds"]) not in evaluated:
                raise ConfigError(
                    "study.head_to_head", f"{spec!r} is no arm of the grid; its arms: {sorted(evaluated)}"
                )
    return list(stages.values()), info
