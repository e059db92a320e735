"""The loss family: every TRL 1.16 DPO loss (and mixtures, LD-DPO, f-DPO) against TRL, SimPO by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from synpref.core.errors import ConfigError
from synpref.core.logprobs import token_logps
from synpref.core.losses import TRL_LOSSES, PreferenceLoss
from synpref.core.models import load_causal_lm
from synpref.core.specs import ModelSpec
from synpref.modules.dpo import DPOModule
from tests.test_dpo import data, fit

# Settings a loss needs to be meaningful (EXO is undefined at ε = 0); the rest keep TRL's defaults.
NEEDS = {"exo_pair": {"label_smoothing": 1e-3}, "robust": {"label_smoothing": 0.1}, "aot": {"label_smoothing": 0.1}}
CASES = [{"loss_type": [name], **NEEDS.get(name, {})} for name in TRL_LOSSES] + [
    {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},  # MPO
    {"loss_type": ["sigmoid"], "ld_alpha": 0.5},
    {"loss_type": ["sigmoid_norm", "sft"], "ld_alpha": 0.0},
    {"loss_type": ["sigmoid"], "f_divergence_type": "forward_kl"},
    {"loss_type": ["hinge"], "f_divergence_type": "js_divergence"},
    {"loss_type": ["ipo"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
    {"loss_type": ["discopop"], "discopop_tau": 0.2, "beta": 0.5},
]
ids = ["+".join(c["loss_type"]) + "".join(f",{k}={v}" for k, v in c.items() if k != "loss_type") for c in CASES]


@pytest.fixture(scope="module", params=["float64", "float32"])
def setup(request, sample_dir, tiny_model):
    dm = data(sample_dir, 24, tiny_model=tiny_model)
    dm.setup("fit")
    items = [dm.train_set[i] for i in range(6)]
    torch.manual_seed(0)
    ref = load_causal_lm(tiny_model, dtype=request.param)
    policy = copy.deepcopy(ref)
    with torch.no_grad():  # a policy that has moved away from the reference
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return dm, items, policy, ref


def with_our_token_logps(model):
    """TRL's model, its per-token log-probs replaced by synpref's chunked ones at the same positions.

    TRL 1.16's fused LM head is a tiled approximation on CPU (~3e-3 per token in fp32, tests/test_dpo.py),
    far above the 1e-6 this compares; the log-prob kernel has its own tests (tests/test_logprobs.py).
    So both sides start from the same per-token log-probs, and what is compared is everything after:
    TRL's collator, masks, LD-DPO split, f-divergence, each loss, the mixture, rewards and the backward
    into the weights. The swapped tensor keeps its graph, so TRL's gradients flow through it.
    """
    fused = model.forward

    def forward(*args, fused_lm_head=False, labels=None, **kw):
        out = fused(*args, fused_lm_head=fused_lm_head, labels=labels, **kw)
        if fused_lm_head:
            batch = {"input_ids": kw["input_ids"], "attention_mask": kw["attention_mask"], "labels": labels}
            per_token, _ = token_logps(model, batch, chunk_size=8)
            keep = labels[:, 1:] != -100
            log_probs = per_token.new_zeros(keep.shape).masked_scatter(keep, per_token)
            assert (log_probs - out.log_probs).abs().max() < 0.05  # the same positions as TRL's own
            out.log_probs = log_probs
        return out

    model.forward = forward


def trl_step(policy, ref, tok, items, case):
    """TRL 1.16 DPOTrainer's loss, logged rewards and policy gradients on our tokens."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir="unused", report_to="none", use_cpu=True, bf16=False, per_device_train_batch_size=len(items),
        max_length=None, **case,
    )  # fmt: skip
    dummy = Dataset.from_list([{"prompt": "q", "chosen": "a", "rejected": "b"}])
    trainer = DPOTrainer(
        model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=args, train_dataset=dummy, processing_class=tok
    )
    for model in (trainer.model, trainer.ref_model):
        with_our_token_logps(model)
    inputs = trainer.data_collator([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in items])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    return loss.item(), metrics, grads


def our_step(tiny_model, policy, ref, dm, items, case):
    """DPOModule.dpo_step, the training path itself (chunk of 8 positions, the LM head never called whole)."""
    module = DPOModule(ModelSpec(tiny_model), logits_chunk_size=8, **case)
    module.model = copy.deepcopy(policy)
    module._ref.append(copy.deepcopy(ref))
    for model in (module.model, module._ref[0]):
        model.get_output_embeddings().forward = lambda *_: pytest.fail("full logits built")
    module.model.train()
    metrics = module.dpo_step(dm.collate(items))
    metrics["loss"].backward()
    return metrics, {n: p.grad for n, p in module.model.named_parameters()}


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_every_trl_loss_matches_trl(setup, tiny_model, case):
    """Loss, rewards and every weight's gradient equal TRL's: within 1e-6 in float64, which measures the
    code; in fp32 within fp32's resolution of the sums. A response's log-prob is a sum of ~100 tokens
    (~ −630 here, whose ulp is 6.1e-5) and TRL sums in another order (a dense sum per row, ours an
    index_add), so fp32 rewards differ by ~β·ulp and losses that exponentiate log-ratios (f-divergences)
    by more: 1e-6 absolute is below what fp32 sums can resolve."""
    dm, items, policy, ref = setup
    fp64 = next(policy.parameters()).dtype == torch.float64
    if fp64 and case.get("f_divergence_type") == "alpha_divergence":
        pytest.skip("TRL 1.16's alpha_divergence has no clamp bound for float64 (KeyError); compared in fp32")
    ours, our_grads = our_step(tiny_model, policy, ref, dm, items, case)
    loss, trl, trl_grads = trl_step(policy, ref, dm.tokenizer, items, case)
    # exp(±(α−1)·log-ratio) turns the sums' absolute error into a relative one of the loss.
    tol = 1e-6 if fp64 else 1e-3 if case.get("f_divergence_type") in ("forward_kl", "alpha_divergence") else 1e-4
    assert 0 < ours["rewards/accuracies"] < 1 and abs(ours["rewards/margins"]) > 1e-3  # a non-trivial batch
    assert ours["loss"].item() == pytest.approx(loss, abs=tol, rel=tol)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert ours[key].item() == pytest.approx(trl[key], abs=tol, rel=tol), key
    assert sum(g.abs().sum() for g in our_grads.values()) > 0
    for name, grad in our_grads.items():
        if fp64:
            torch.testing.assert_close(grad, trl_grads[name], atol=1e-6, rtol=1e-6, msg=name)
        else:
            assert (grad - trl_grads[name]).norm() <= tol * trl_grads[name].norm() + 1e-8, name


# -- SimPO ---------------------------------------------------------------------------------------
def test_simpo_is_the_papers_formula_on_hand_values():
    """L = −log σ(β/|y_w| log π(y_w|x) − β/|y_l| log π(y_l|x) − γ), Meng et al. 2024, Eq. 6."""
    chosen, rejected = torch.tensor([-12.0, -40.0, -3.0]), torch.tensor([-30.0, -20.0, -3.5])
    n_chosen, n_rejected = torch.tensor([4.0, 10.0, 2.0]), torch.tensor([5.0, 4.0, 7.0])
    beta, gamma = 2.0, 0.8
    losses, rc, rr = PreferenceLoss("simpo", beta=beta, gamma=gamma)(chosen, rejected, None, None, n_chosen, n_rejected)
    for i in range(3):
        margin = beta * chosen[i].item() / n_chosen[i].item() - beta * rejected[i].item() / n_rejected[i].item()
        expected = -math.log(1 / (1 + math.exp(-(margin - gamma))))
        assert losses[i].item() == pytest.approx(expected, rel=1e-6)
        assert rc[i].item() == pytest.approx(beta * chosen[i].item() / n_chosen[i].item())
        assert rr[i].item() == pytest.approx(beta * rejected[i].item() / n_rejected[i].item())
    # TRL has SimPO only in its experimental CPOTrainer (cpo_alpha = 0): its cpo_loss on the averaged log-probs.
    import warnings
    from types import SimpleNamespace

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRLExperimentalWarning: importing from trl.experimental
        from trl.experimental.cpo import CPOTrainer
    cpo = SimpleNamespace(alpha=0.0, simpo_gamma=gamma, beta=beta, loss_type="simpo", label_smoothing=0.0)
    cpo.accelerator = SimpleNamespace(device="cpu")
    trl_losses, trl_rc, trl_rr = CPOTrainer.cpo_loss(cpo, chosen / n_chosen, rejected / n_rejected)
    for ours, theirs in ((losses, trl_losses), (rc, trl_rc), (rr, trl_rr)):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    # γ shifts the margin: a pair scored exactly γ apart is at log 2.
    at_gamma, _, _ = PreferenceLoss("simpo", beta=1.0, gamma=0.5)(
        torch.tensor([-1.0]), torch.tensor([-3.0]), None, None, torch.tensor([1.0]), torch.tensor([2.0])
    )
    assert at_gamma.item() == pytest.approx(math.log(2))


def test_simpo_loads_no_reference(setup, tiny_model, monkeypatch):
    import synpref.modules.dpo as dpo

    dm, items, policy, _ = setup
    monkeypatch.setattr(dpo, "load_frozen_causal_lm", lambda *_: pytest.fail("a reference was loaded"))
    module = DPOModule(ModelSpec(tiny_model), loss_type="simpo", beta=2.0, gamma=0.5, logits_chunk_size=8)
    module.model = copy.deepcopy(policy)
    batch = dm.collate(items)
    metrics = module.dpo_step(batch)
    metrics["loss"].backward()
    assert module._ref == [] and module._ref_table is None
    per_token, rows = token_logps(module.model, batch)
    lengths = torch.bincount(rows, minlength=12).to(per_token.dtype)
    avg = per_token.new_zeros(12).index_add(0, rows, per_token.detach()) / lengths
    expected = -torch.nn.functional.logsigmoid(2.0 * (avg[:6] - avg[6:]) - 0.5).mean()
    assert metrics["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert metrics["rewards/chosen"].item() == pytest.approx(2.0 * avg[:6].mean().item(), rel=1e-6)


def test_simpo_trains_and_validates_without_a_reference(sample_dir, tiny_model, tmp_path, monkeypatch):
    import synpref.modules.dpo as dpo

    monkeypatch.setattr(dpo, "load_frozen_causal_lm", lambda *_: pytest.fail("a reference was loaded"))
    module = DPOModule(ModelSpec(tiny_model), loss_type="simpo", beta=2.0, lr=1e-3, warmup_steps=0)
    steps = fit(module, data(sample_dir, 24, batch_size=4, val_fraction=0.25, tiny_model=tiny_model), tmp_path, 1)
    assert steps and module._ref == [] and all(math.isfinite(s["train/loss"]) for s in steps)


# -- bad settings ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, key, words",
    [
        ({"loss_type": "dpo"}, "loss_type", "unknown 'dpo'"),
        ({"loss_type": ["sigmoid", "kto"]}, "loss_type", "unknown 'kto'"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "loss_weights", "1 weights for 2 loss types"),
        ({"loss_type": "simpo", "gamma": -0.1}, "gamma", "must be ≥ 0"),
        ({"loss_type": ["simpo", "sigmoid"]}, "loss_type", "mixes reference-free losses"),
        ({"loss_type": "exo_pair"}, "label_smoothing", "must be > 0 for exo_pair"),
        ({"loss_type": "bco_pair", "f_divergence_type": "forward_kl"}, "f_divergence_type", "only supported"),
        ({"f_divergence_type": "chi2"}, "f_divergence_type", "unknown 'chi2'"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing", "applies to"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, "label_smoothing", "[0, 0.5)"),
        ({"discopop_tau": 0.0}, "discopop_tau", "must be > 0"),
        ({"beta": 0.0}, "beta", "must be > 0"),
    ],
)
def test_bad_loss_settings_name_their_key(kw, key, words):
    with pytest.raises(ConfigError) as err:
        PreferenceLoss(**kw)
    assert err.value.key == f"model.init_args.{key}" and words in str(err.value)


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"loss_type": "simpo", "ref_model": "REF"}, "ref_model.name_or_path"),
        ({"loss_type": "simpo", "precompute_ref_logps": True}, "precompute_ref_logps"),
        ({"ld_alpha": 1.5}, "ld_alpha"),
        ({"loss_type": "sigmoid", "loss_weights": [0.5, 0.5]}, "loss_weights"),
    ],
)
def test_bad_module_settings_name_their_key(tiny_model, kw, key):
    if kw.get("ref_model") == "REF":
        kw["ref_model"] = ModelSpec(tiny_model)
    with pytest.raises(ConfigError) as err:
        DPOModule(ModelSpec(tiny_model), **kw)
    assert err.value.key == f"model.init_args.{key}"


def test_ld_alpha_precomputed_reference_equals_live(sample_dir, tiny_model, tmp_path):
    """The cached table holds LD-weighted sums, under a key that includes α: live and precomputed agree."""
    import lightning as L

    def validate(**kw):
        L.seed_everything(0)
        module = DPOModule(ModelSpec(tiny_model), ref_cache_dir=str(tmp_path / "cache"), **kw)
        module.model = load_causal_lm(tiny_model)
        with torch.no_grad():
            for p in module.model.parameters():
                p.add_(0.05 * torch.randn_like(p))  # policy ≠ reference
        # Long enough that replies keep their own lengths (cut to one length, no token is beyond the shared one).
        dm = data(sample_dir, 24, max_length=1024, batch_size=4, val_fraction=0.25, tiny_model=tiny_model)
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
        return trainer.validate(module, dm, verbose=False)[0]

    live = validate(ld_alpha=0.3)
    plain = validate(precompute_ref_logps=True)
    pre = validate(ld_alpha=0.3, precompute_ref_logps=True)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # α is part of the cache key
    for key, value in live.items():
        assert pre[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert plain["val/rewards/margins"] != pytest.approx(live["val/rewards/margins"], rel=1e-3)  # α changed them
