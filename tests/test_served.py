"""Sampling and evaluation through a real `transformers serve` on 127.0.0.1, and `reproduce` starting/stopping it."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace

import pytest
import yaml

from synpref.cli import main
from synpref.core.models import load_frozen_causal_lm, load_tokenizer
from synpref.core.specs import Decoding, ModelSpec
from synpref.generation import generate
from synpref.generators import OpenAIGenerator, request_seed
from synpref.http import HttpSettings
from synpref.pipeline.services import Service, running
from tests.conftest import ROOT, free_port, read_jsonl
from tests.test_evaluation import perturbed_copy
from tests.test_real_template import EOT, IM_END, chain_model

DECODING = Decoding(max_new_tokens=8, do_sample=True, temperature=0.7, top_k=50, top_p=1.0)


def serve_service(port: int) -> Service:
    """The service configs/tiny/paper_served.yaml declares, on another port."""
    (svc,) = yaml.safe_load((ROOT / "configs/tiny/paper_served.yaml").read_text())["services"]
    svc["command"] = svc["command"].replace("8765", str(port))
    svc["health_url"] = svc["health_url"].replace("8765", str(port))
    return Service(**svc)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    with pytest.MonkeyPatch.context() as env:
        for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):  # requests stay on loopback
            env.delenv(var, raising=False)
        with running(serve_service(port), tmp_path_factory.mktemp("serve") / "serve.log") as proc:
            yield f"http://127.0.0.1:{port}/v1", proc
    assert proc.poll() is not None


@pytest.fixture(scope="module")
def baseline(tiny_model, tmp_path_factory):
    return perturbed_copy(tiny_model, tmp_path_factory.mktemp("served_baseline") / "sft")


def prompts_of(sample_dir, n):
    return [[{"role": "user", "content": r["prompt"][:300]}] for r in read_jsonl(sample_dir / "test_prefs.jsonl")[:n]]


def test_served_samples_equal_in_process_generate_at_the_same_seed(server, tiny_model, sample_dir):
    """transformers serve decodes with what synpref sends (top-k, temperature, end of turn) and
    honours the per-request seed: each served sample is in-process generate() at that seed, through
    chat completions (the server's chat template) and text completions (synpref's)."""
    tok, model = load_tokenizer(tiny_model), load_frozen_causal_lm(ModelSpec(tiny_model))
    prompts = prompts_of(sample_dir, 2)
    for api, k in (("chat", 2), ("completions", 1)):
        gen = OpenAIGenerator(
            HttpSettings(base_url=server[0], timeout=600.0, max_concurrency=1), server="transformers", api=api
        )
        texts, counts = gen.generate(
            tiny_model, tok, prompts, [3, 7], replace(DECODING, seed=11), num_return_sequences=k
        )
        for p, i, row, row_counts in zip(prompts, [3, 7], texts, counts):
            for j in range(k):
                ref_texts, ref_counts = generate(model, tok, [p], replace(DECODING, seed=request_seed(11, i, j)))
                assert (row[j], row_counts[j]) == (ref_texts[0][0], ref_counts[0][0])
        assert gen.stats["requests"] == 2 * k
        assert gen.stats["truncated"] == sum(c == 8 for row in counts for c in row)


@pytest.mark.parametrize("stop", [IM_END, EOT], ids=["im_end", "endoftext"])
def test_served_replies_stop_at_either_end_token(server, stop, tmp_path):
    """A model that goes on after the end token (see chain_model) is stopped there by the server: when
    synpref sends the end-of-turn ids (server: transformers) and when the server reads them from the
    model's generation_config.json alone (server: openai, as vLLM and SGLang do)."""
    path = chain_model(tmp_path, stop)
    tok = load_tokenizer(path)
    prompts = [[{"role": "user", "content": "Name a colour."}]] * 2
    for api, kind in itertools.product(("chat", "completions"), ("transformers", "openai")):
        gen = OpenAIGenerator(HttpSettings(base_url=server[0], max_concurrency=1), server=kind, api=api)
        texts, counts = gen.generate(
            path, tok, prompts, [0, 1], Decoding(max_new_tokens=6, do_sample=False), num_return_sequences=1
        )
        assert texts == [["Blue sky"]] * 2, (api, kind)
        assert counts == [[2]] * 2 and gen.stats["truncated"] == 0, (api, kind)


def predict_args(server_url, model, out, extra=()):
    # The server was started elsewhere: it is asked for the model by its absolute path.
    return [
        "predict",
        "--config",
        "configs/tiny/sample.yaml",
        "--config",
        "configs/tiny/sample_served.yaml",
        f"--model.init_args.policy.name_or_path={model}",
        f"--model.init_args.generator.init_args.http.base_url={server_url}",
        f"--model.init_args.output_dir={out}",
        "--model.init_args.decoding.max_new_tokens=8",
        "--data.init_args.max_prompts=6",
        "--data.init_args.batch_size=2",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]


def test_predict_through_the_server_then_kill_and_resume_gives_the_same_bytes(server, in_tmp, tiny_model):
    url = server[0]
    main(predict_args(url, tiny_model, "ref"))
    samples, pairs = read_jsonl(in_tmp / "ref/samples.jsonl"), read_jsonl(in_tmp / "ref/pairs.jsonl")
    assert len(samples) == 12 and {s["sample"] for s in samples} == {0, 1}
    assert all(0 < s["num_tokens"] <= 8 for s in samples)
    assert pairs and all(p["score_chosen"] - p["score_rejected"] >= 0.1 for p in pairs)

    proc = subprocess.Popen(
        [sys.executable, "-m", "synpref", *predict_args(url, tiny_model, "run")],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    part = in_tmp / "run/parts/part-001-000.jsonl"
    deadline = time.time() + 120
    while (not part.exists() or part.read_bytes().count(b"\n") < 1) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 1 <= part.read_bytes().count(b"\n") < 6 and not (in_tmp / "run/samples.jsonl").exists()
    main(predict_args(url, tiny_model, "run"))
    for name in ("samples.jsonl", "pairs.jsonl"):
        assert (in_tmp / "run" / name).read_bytes() == (in_tmp / "ref" / name).read_bytes()


def test_evaluation_serves_policy_and_baseline_by_their_paths(server, in_tmp, tiny_model, baseline, sample_dir):
    main(
        [
            "predict",
            "--config",
            "configs/tiny/eval.yaml",
            "--config",
            "configs/tiny/eval_served.yaml",
            f"--model.init_args.policy.name_or_path={tiny_model}",
            f"--model.init_args.baseline.name_or_path={baseline}",
            f"--model.init_args.generator.init_args.http.base_url={server[0]}",
            "--model.init_args.output_dir=eval",
            "--model.init_args.decoding.max_new_tokens=8",
            "--data.init_args.max_prompts=3",
            "--trainer.enable_progress_bar=false",
        ]
    )
    rows = sorted(read_jsonl(in_tmp / "eval/eval.jsonl"), key=lambda r: r["index"])
    assert len(rows) == 3
    # Each model answered as itself, at the prompt's seed (independent reference: in-process generate).
    for key, path in (("policy", tiny_model), ("baseline", baseline)):
        tok, model = load_tokenizer(path), load_frozen_causal_lm(ModelSpec(path))
        for row in rows:
            texts, counts = generate(model, tok, [row["prompt"]], replace(DECODING, seed=request_seed(0, row["index"])))
            assert (row[f"{key}_response"], row[f"{key}_length"]) == (texts[0][0], counts[0][0])
    assert any(r["policy_response"] != r["baseline_response"] for r in rows)


def test_reproduce_starts_the_server_for_served_stages_and_stops_it(in_tmp, tiny_model, baseline):
    """configs/tiny/paper_served.yaml's service and served stages (sample, one evaluation), with the
    models they read already in place; the server is up during them and gone afterwards."""
    config = yaml.safe_load((ROOT / "configs/tiny/paper_served.yaml").read_text())
    port = free_port()
    svc = serve_service(port).__dict__
    config["services"] = [{**svc, "stages": ["sample", "eval_dpo_synthetic"]}]
    config["build_tiny_model"] = None
    keep = {
        "sample": ["--data.init_args.max_prompts=4", "--model.init_args.decoding.max_new_tokens=6"],
        "eval_dpo_synthetic": ["--data.init_args.max_prompts=3", "--model.init_args.decoding.max_new_tokens=6"],
    }
    config["stages"] = [
        {
            **s,
            "needs": [],
            "args": s.get("args", [])
            + keep[s["name"]]
            + [f"--model.init_args.generator.init_args.http.base_url=http://127.0.0.1:{port}/v1"],
        }
        for s in config["stages"]
        if s["name"] in keep
    ]
    (in_tmp / "artifacts/tiny/sft").symlink_to(baseline)
    (in_tmp / "artifacts/tiny/dpo_synthetic").symlink_to(tiny_model)
    (in_tmp / "served.yaml").write_text(yaml.safe_dump(config))
    main(["reproduce", "--config", "served.yaml"])
    assert len(read_jsonl(in_tmp / "artifacts/tiny/samples/samples.jsonl")) == 8
    assert len(read_jsonl(in_tmp / "artifacts/tiny/eval/dpo_synthetic/eval.jsonl")) == 3
    log = (in_tmp / config["state_dir"] / "generation_server.log").read_text()
    assert log.count("Uvicorn running") == 1 and "POST /v1/chat/completions" in log
    with pytest.raises(OSError):
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(svc["health_url"], timeout=2)
