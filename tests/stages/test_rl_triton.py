"""loss.impl=triton inside the RL module (fused Triton policy loss from hidden states) gives the torch path's
loss, stats and gradients — run on CPU under TRITON_INTERPRET=1 in a subprocess (the interpreter flag must be set
before triton is imported and must not leak into other tests)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from kat_testing import CONF, ROOT

SCRIPT = textwrap.dedent("""
    import json, os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from hydra import compose, initialize_config_dir
    import kat.config, kat.config.lightning  # noqa: F401  (register the config schemas, as tests/conftest.py)
    from kat import models
    from kat.models.tokenizer import render_prompt
    from kat.rollout import hf
    from kat.stages.rl import RL, select_loss_impl

    with initialize_config_dir(config_dir=%(conf)r, version_base="1.3"):
        cfg = compose("train", overrides=["+stage=rl", "model.arch.hidden_size=32", "model.arch.intermediate_size=64",
                                          "model.arch.num_hidden_layers=1", "rollout.group_size=3",
                                          "algorithm.loss.kl_coef=0.1", "algorithm.loss.clip_ratio_c=3.0"])
    torch.manual_seed(0)
    model, tok = models.load(cfg.model)
    m = RL.from_config(cfg, model, tok)
    assert select_loss_impl("triton", m.model, "token")[0] == "triton"  # the interpreter runs it on request
    assert select_loss_impl("auto", m.model, "token")[0] == "torch"  # but auto never picks the slow interpreter
    prompts = [render_prompt(tok, [{"role": "user", "content": c}]) for c in ["1+2", "33+4", "code: f(x)=x+1+2"]]
    roll = hf.sample(m.model, tok, prompts, group_size=3, max_new_tokens=9)
    N, T = roll.old_logp.shape
    _, mask = roll.response_tensors(tok.pad_token_id)
    g = torch.Generator().manual_seed(1)
    dec = torch.zeros_like(mask)
    dec[:, 1] = True
    tensors = {"old": roll.old_logp + 0.3 * torch.randn(N, T, generator=g) * mask,
               "adv": torch.randn(N, T, generator=g) * mask, "mask": mask, "dec": dec & mask,
               "ref": m.reference_logprobs(roll) + 0.05 * torch.randn(N, T, generator=g) * mask}
    out = {}
    for impl in ("torch", "triton"):
        m.loss_impl = impl
        m.model.zero_grad(set_to_none=True)
        st = m.accumulate_gradients(roll, range(N), tensors, 0.5, micro_batch_size=4)
        out[impl] = {"stats": st, "grads": [p.grad.flatten().tolist() for p in m.model.parameters()]}
    print("RESULT" + json.dumps(out))
""")


def test_triton_loss_path_matches_torch_path(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT % {"conf": str(CONF)})
    r = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.split("RESULT", 1)[1])
    a, b = res["torch"], res["triton"]
    for k in ("loss", "tokens", "entropy_sum", "clip_frac", "clip_frac_low", "clip_frac_high", "approx_kl", "kl"):
        assert abs(a["stats"][k] - b["stats"][k]) <= 1e-5 * max(1.0, abs(a["stats"][k])), k
    assert a["stats"]["clip_frac"] > 0  # the clip is active in this case
    import torch

    for ga, gb in zip(a["grads"], b["grads"]):
        torch.testing.assert_close(torch.tensor(gb), torch.tensor(ga), rtol=1e-4, atol=1e-6)
