"""kat.rl.update without Lightning: a tiny policy, hand-built rollouts, a plain torch optimizer."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from kat import models
from kat.losses import grpo as G
from kat.rl import update as U
from kat.rollout import hf

SMALL = ["model.arch.hidden_size=32", "model.arch.intermediate_size=64", "model.arch.num_hidden_layers=2"]


@pytest.fixture
def setup(compose_cfg):
    cfg = compose_cfg(["+stage=rl", *SMALL])
    torch.manual_seed(0)
    model, tok = models.load(cfg.model)
    model.eval()
    gen = torch.Generator().manual_seed(3)
    V = model.config.vocab_size
    N, T = 8, 6  # 2 groups of 4
    prompts = [torch.randint(0, V - 16, (3 + i % 3,), generator=gen).tolist() for i in range(N)]
    resp = [torch.randint(0, V - 16, (T - i % 2,), generator=gen).tolist() for i in range(N)]
    old = hf.response_logprobs(model, prompts, resp, pad_id=tok.pad_token_id)
    roll = hf.Rollouts(prompt_ids=prompts, response_ids=resp, texts=[""] * N, truncated=[False] * N, old_logp=old,
                       forced=torch.zeros_like(old, dtype=torch.bool), group_size=4, logprobs_source="recompute")
    _, mask = roll.response_tensors(tok.pad_token_id)
    tensors = {"old": old + 0.05 * torch.randn(old.shape, generator=gen) * mask,
               "adv": torch.randn(old.shape, generator=gen) * mask, "mask": mask, "ref": None, "dec": None}
    loss = OmegaConf.merge(cfg.algorithm.loss, {"clip_eps_low": 0.2, "clip_eps_high": 0.28})
    kw = U.loss_kwargs(loss, max_new_tokens=T)
    spec = U.LossSpec(kw=kw, impl="torch", temperature=1.0, pad_id=tok.pad_token_id)
    return model, roll, tensors, spec


def test_accumulate_gradients_is_invariant_to_the_micro_batch_split(setup):
    model, roll, tensors, spec = setup
    N = len(roll)
    out = []
    for mbs in (N, 3, 1):
        model.zero_grad(set_to_none=True)
        st = U.accumulate_gradients(model, roll, range(N), tensors, 1.0, loss=spec, micro_batch_size=mbs,
                                    device="cpu")
        out.append((st, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    for st, grads in out[1:]:
        assert st["loss"] == pytest.approx(out[0][0]["loss"], rel=1e-5, abs=1e-7)
        assert st["tokens"] == out[0][0]["tokens"] == float(tensors["mask"].sum())
        for a, b in zip(grads, out[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    # the summed micro-batch losses are the full batch's policy_loss
    pk = hf.pack(roll.prompt_ids, roll.response_ids, spec.pad_id)
    with torch.no_grad():
        logp = G.selective_log_softmax(hf.response_logits(model, pk), pk.response_ids)
    full, _ = G.policy_loss(logp, tensors["old"], tensors["adv"], tensors["mask"], **spec.kw)
    assert out[0][0]["loss"] == pytest.approx(float(full), rel=1e-5, abs=1e-7)


def test_update_steps_the_optimizer_per_mini_batch_and_clips(setup):
    model, roll, tensors, spec = setup
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    steps, clips = [], []
    real_step = opt.step

    def counting_step():
        steps.append(1)
        real_step()

    opt.step = counting_step
    cfg = U.UpdateConfig(ppo_epochs=2, mini_batches=2, micro_batch_size=3, grad_clip=1.0)
    st = U.update(model, roll, tensors, 1.0, group_size=4, cfg=cfg, loss=spec, optimizer=opt, device="cpu",
                  seed=0, step=lambda: len(steps), clip=clips.append)
    assert len(steps) == 4 and st["updates"] == 4 and clips == [1.0] * 4
    assert st["tokens"] == 2 * float(tensors["mask"].sum()) and st["grad_norm"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_update_config_and_loss_settings_are_checked(compose_cfg):
    cfg = compose_cfg(["+stage=rl"])  # the typed nodes (kat.rl.config) the RL stage reads
    upd = cfg.stage.module["update"]  # .update: the mapping method
    with pytest.raises(ValueError, match="stage.module.update.mini_batches must be >= 1"):
        U.UpdateConfig.from_config(OmegaConf.merge(upd, {"mini_batches": 0}))
    assert U.UpdateConfig.from_config(OmegaConf.merge(upd, {"grad_clip": None, "micro_batch_size": 4})) \
        == U.UpdateConfig(micro_batch_size=4, grad_clip=None)
    assert U.UpdateConfig.from_config(upd) == U.UpdateConfig()  # the dataclass defaults are conf/stage/rl.yaml's
    with pytest.raises(ConfigKeyError, match="clip_eps"):  # an unknown algorithm.loss key: its schema rejects it
        OmegaConf.merge(cfg.algorithm.loss, {"clip_eps": 0.2})
    assert U.loss_kwargs(OmegaConf.merge(cfg.algorithm.loss, {"norm_const": None}), 16)["norm_const"] == 16.0

    def algo(**loss):
        return OmegaConf.merge(cfg.algorithm, {"loss": {"kl_coef": 0.0, "reference": "auto", **loss}})

    assert U.wants_reference(algo(kl_coef=0.1)) and not U.wants_reference(algo())
    with pytest.raises(ValueError, match="needs a reference model"):
        U.wants_reference(algo(kl_coef=0.1, reference=False))
