"""Distill stage: loss terms against a hand-written reference (depths 0..2), gradients reach every MTP
depth and never the teacher, prompt/trigger rows carry zero weight, dual teachers pick by mode,
vocabulary padding, the ULD implementation choice, and the real entry point (online and offline)."""
from __future__ import annotations

import csv
import logging

import pytest
import torch
import torch.nn.functional as F

from kat.data import datamodule as D
from kat.data import synthetic as S
from kat.losses.uld import uld_loss
from kat.models import hf, mtp
from kat.models.teacher import OnlineTeacher, answer_positions, load_teacher_model, teacher_columns
from kat.stages.distill import Distill, resolve_uld
from kat_testing import run_module

STUDENT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
           "intermediate_size": 64, "max_position_embeddings": 256, "tie_word_embeddings": True}
TEACHER = {**STUDENT, "hidden_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2}
LOSS = {"w_ce": 0.7, "w_uld": 1.3, "student_temperature": 1.5, "teacher_temperature": 0.8, "mtp_lambda": 0.25,
        "mtp_lambda_final": 0.1, "mtp_lambda_switch": 0.7}


def _model(tok, arch, seed):
    torch.manual_seed(seed)
    return hf.build_from_config(arch, tok).eval()


def _teacher_model(tok, seed=1):
    m = _model(tok, TEACHER, seed)
    m.requires_grad_(False)
    return m


def _batch(tok, levels=(1, 4)):
    items = S.generate(1, seed=0, domains=("math", "science"), levels=levels)
    exs = D.build_examples(tok, items, template="distill", modes="both", max_length=256)
    return D.pad_collate(tok.pad_token_id)(exs), exs


def _module(tok, depth=2, teacher=None, loss=LOSS):
    model = _model(tok, STUDENT, 0)
    teacher = teacher or OnlineTeacher({"single": _teacher_model(tok)}, columns=len(tok))
    heads = mtp.MTPHeads(model, depth) if depth else None
    return Distill(model, tok, optim={"lr": 1e-3}, val={"fmt": "distill", "modes": ["on", "off"]}, teacher=teacher,
                   mtp=heads, loss=dict(loss), impl="torch")


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_losses_match_hand_written_reference(char_tokenizer, depth):
    tok = char_tokenizer
    mod = _module(tok, depth)
    batch, _ = _batch(tok)
    labels = batch["labels"]
    rows = answer_positions(labels)
    hs = mod.student_hidden(batch)
    got = mod.loss_from_hidden(hs, labels, rows, mod.teacher_rows(batch, rows))

    with torch.no_grad():
        t_full = mod.teacher.models["single"](input_ids=batch["input_ids"],
                                              attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    total = 0.0
    for k, h in enumerate(hs):
        s_full = mtp.lm_logits(mod.model, h)  # (B, T, V)
        ces, ulds = [], []
        B, T = labels.shape
        for b in range(B):
            for p in range(T - 1):
                if labels[b, p + 1] == -100:
                    continue
                i = p - k  # depth k at position i predicts t_{i+k+1} = t_{p+1}; teacher row i+k = p
                ces.append(-torch.log_softmax(s_full[b, i].float(), -1)[labels[b, p + 1]])
                ulds.append(uld_loss(s_full[b, i][None], t_full[b, p][None], student_temperature=1.5,
                                     teacher_temperature=0.8))
        ce, uld = torch.stack(ces).mean(), torch.stack(ulds).mean()
        # the same CE in Megatron's form: targets rolled left by k+1, loss over the rolled mask
        rolled = mtp.shift_targets(labels, k)
        ce_roll = F.cross_entropy(s_full.float().reshape(-1, s_full.shape[-1]), rolled.reshape(-1), ignore_index=-100)
        torch.testing.assert_close(ce_roll, ce, rtol=1e-5, atol=1e-6)
        name_ce, name_uld = ("ce", "uld") if k == 0 else (f"mtp_ce_d{k}", f"mtp_uld_d{k}")
        torch.testing.assert_close(got[name_ce], ce, rtol=1e-5, atol=1e-6, msg=name_ce)
        torch.testing.assert_close(got[name_uld], uld, rtol=1e-5, atol=1e-6, msg=name_uld)
        term = 0.7 * ce + 1.3 * uld
        total = total + (term if k == 0 else 0.25 / depth * term)
    torch.testing.assert_close(got["loss"], total, rtol=1e-5, atol=1e-6)


def test_gradient_reaches_every_depth_never_the_teacher(char_tokenizer):
    mod = _module(char_tokenizer, depth=2)
    batch, _ = _batch(char_tokenizer)
    mod.compute_losses(batch)["loss"].backward()
    for k, dep in enumerate(mod.mtp.depths, start=1):
        for name, p in dep.named_parameters():
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, f"depth {k}: {name} got no gradient"
    assert float(mod.model.get_input_embeddings().weight.grad.abs().sum()) > 0
    teacher = mod.teacher.models["single"]
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    own = {id(p) for p in mod.parameters()}
    assert not any(id(p) in own for p in teacher.parameters()), "teacher parameters must not be trainable"
    assert all(".teacher" not in k and not k.startswith("teacher") for k in mod.state_dict()), "teacher checkpointed"
    assert {id(p) for p in mod.trainable_parameters()} == own


def test_prompt_and_trigger_rows_carry_zero_weight(char_tokenizer):
    tok = char_tokenizer
    mod = _module(tok, depth=2)
    batch, exs = _batch(tok)
    labels = batch["labels"]
    rows = answer_positions(labels)
    targets = labels[rows[:, 0], rows[:, 1] + 1]
    triggers = {tok.convert_tokens_to_ids("<think_on>"), tok.convert_tokens_to_ids("<think_off>")}
    assert not triggers & set(targets.tolist()), "a trigger token is a loss target"
    hs = [h.detach().requires_grad_() for h in mod.student_hidden(batch)]
    loss = mod.loss_from_hidden(hs, labels, rows, mod.teacher_rows(batch, rows))["loss"]
    grads = torch.autograd.grad(loss, hs)
    for k, g in enumerate(grads):
        live = g.abs().amax(-1) > 0  # (B, T)
        target_k = mtp.shift_targets(labels, k)  # row i's target t_{i+k+1}
        assert not bool(live[target_k == -100].any()), f"depth {k}: prompt/trigger/padding rows got gradient"
        assert bool(live[target_k != -100].all()), f"depth {k}: an answer row got no gradient"
        for b, ex in enumerate(exs):
            trig = ex["n_prompt"] - 1  # the trigger is the last input token
            assert ex["input_ids"][trig] in triggers
            if trig - 1 - k >= 0:  # the row whose depth-k target is the trigger
                assert float(g[b, trig - 1 - k].abs().sum()) == 0.0


def test_dual_teacher_chooses_by_mode(char_tokenizer):
    tok = char_tokenizer
    on, off = _teacher_model(tok, seed=11), _teacher_model(tok, seed=12)
    teacher = OnlineTeacher({"on": on, "off": off}, columns=len(tok))
    batch, exs = _batch(tok)
    assert batch["mode_on"].tolist() == [e["mode"] == "on" for e in exs]
    rows = answer_positions(batch["labels"])
    got = teacher.logits(batch["input_ids"], batch["attention_mask"], rows, mode_on=batch["mode_on"])
    with torch.no_grad():
        full = {m: t(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                for m, t in (("on", on), ("off", off))}
    for n, (b, p) in enumerate(rows.tolist()):
        want = full["on" if exs[b]["mode"] == "on" else "off"][b, p]
        torch.testing.assert_close(got[n], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="mode_on"):
        teacher.logits(batch["input_ids"], batch["attention_mask"], rows, mode_on=None)
    mod = _module(tok, depth=1, teacher=teacher)
    assert torch.isfinite(mod.compute_losses(batch)["loss"])


def test_padding_rows_are_sliced_and_real_mismatch_is_an_error(char_tokenizer, caplog):
    n = len(char_tokenizer)
    with caplog.at_level(logging.INFO):
        assert teacher_columns(n, [n + 64], n) == n
    assert "padding" in caplog.text and "sliced" in caplog.text
    assert teacher_columns(n + 8, [n], n) == n  # teacher has fewer padding rows: ULD zero-pads it
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        teacher_columns(n, [n - 3], n)
    # a teacher whose logits have padding rows gives sliced logits
    padded = hf.build_from_config(TEACHER, char_tokenizer)
    padded.resize_token_embeddings(n + 16)
    t = OnlineTeacher({"single": padded.eval()}, columns=teacher_columns(n, [n + 16], n))
    batch, _ = _batch(char_tokenizer, levels=(1,))
    rows = answer_positions(batch["labels"])
    assert t.logits(batch["input_ids"], batch["attention_mask"], rows).shape == (rows.shape[0], n)


def _foreign_teacher_dir(tmp_path, seed=5):
    """A teacher whose tokenizer has one token per two-digit number (the student's is per character)."""
    from kat.models.tokenizer import build_char_tokenizer

    ttok = build_char_tokenizer()
    ttok.add_tokens([str(n) for n in range(10, 100)])
    torch.manual_seed(seed)
    m = hf.build_from_config(TEACHER, ttok)
    d = tmp_path / "foreign"
    hf.save(m, ttok, d)
    return d


def test_cross_tokenizer_teacher_is_aligned_by_offsets(char_tokenizer, tmp_path):
    from kat.data import align as A
    from kat.models.teacher import build_teacher

    tok = char_tokenizer
    d = _foreign_teacher_dir(tmp_path)
    cfg = {"kind": "online", "path": str(d), "align": "offsets", "model": {}}
    teacher = build_teacher(cfg, tok, student_rows=len(tok))
    assert teacher.cross and teacher.columns == len(teacher.teacher_tokenizer) == len(tok) + 90
    with pytest.raises(ValueError, match="teacher.align=none"):
        build_teacher({**cfg, "align": "none"}, tok, student_rows=len(tok))
    m, ttok = load_teacher_model(str(d), {}, tok)
    mod = _module(tok, depth=2, teacher=teacher)
    batch, exs = _batch(tok, levels=(3, 4))
    labels = batch["labels"]
    got = mod.compute_losses(batch)
    hs = mod.student_hidden(batch)
    for k in range(3):
        ulds, n_pairs, n_rows = [], 0, 0
        s_full = mtp.lm_logits(mod.model, hs[k])  # (B, T, V_s)
        for b, ex in enumerate(exs):
            a = ex["n_prompt"]
            body = ex["input_ids"][a:-1]  # answer without EOS
            text = tok.decode(body)
            t_prompt = ttok.encode(tok.decode(ex["input_ids"][:a]), add_special_tokens=False)
            r = A.align_answer(tok, ttok, text, student_answer_start=a, teacher_answer_start=len(t_prompt), depth=k)
            assert r.student_ids == body
            t_seq = t_prompt + r.teacher_ids + [ttok.eos_token_id]
            with torch.no_grad():
                t_full = m(input_ids=torch.tensor([t_seq])).logits[0]  # (T_t, V_t)
            pairs = list(zip(r.student_rows.tolist(), r.teacher_rows.tolist()))
            pairs.append((a + len(body) - 1 - k, len(t_prompt) + len(r.teacher_ids) - 1))  # EOS
            n_pairs += len(pairs)
            n_rows += len(body) + 1
            for i, t in pairs:
                ulds.append(uld_loss(s_full[b, i][None], t_full[t][None], student_temperature=1.5,
                                     teacher_temperature=0.8))
        assert 0 < n_pairs < n_rows  # two-digit numbers merge characters: fewer pairs than answer tokens
        name = "uld" if k == 0 else f"mtp_uld_d{k}"
        torch.testing.assert_close(got[name], torch.stack(ulds).mean(), rtol=1e-4, atol=1e-5, msg=name)
    got["loss"].backward()
    assert all(p.grad is not None for p in mod.mtp.parameters())


def test_uld_implementation_choice(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fn, name = resolve_uld("auto", torch.device("cpu"), topk=False)
    assert fn is uld_loss and name.startswith("torch")
    fn, name = resolve_uld("torch", torch.device("cpu"), topk=True)
    assert name.startswith("torch") and "uld_loss_topk" in name
    with pytest.raises(RuntimeError, match="CUDA"):
        resolve_uld("triton", torch.device("cpu"), topk=False)
    with pytest.raises(ValueError, match="loss.impl"):
        resolve_uld("fast", torch.device("cpu"), topk=False)
    from kat.losses.uld import uld_loss_chunked

    fn, name = resolve_uld("chunked", torch.device("cpu"), topk=False)
    assert fn is uld_loss_chunked and "chunked" in name
    # auto on CUDA: the chunked form for full logits (no CUDA needed to resolve the choice)
    assert resolve_uld("auto", torch.device("cuda"), topk=False)[0] is uld_loss_chunked
    with pytest.raises(RuntimeError, match="top-k"):
        resolve_uld("chunked", torch.device("cpu"), topk=True)


def test_bad_loss_settings_are_errors(char_tokenizer, compose_cfg):
    from hydra.errors import ConfigCompositionException

    from kat.config import SchemaError

    # an unknown loss setting fails when the config is composed (kat.config.schemas.DistillLossConfig)
    with pytest.raises(SchemaError, match="loss.w_kd"):
        compose_cfg(["+stage=distill", "+loss.w_kd=1.0"])
    with pytest.raises(ConfigCompositionException, match="loss.w_ce"):
        compose_cfg(["+stage=distill", "loss.w_ce=heavy"])
    with pytest.raises(ValueError, match="teacher_temperature"):
        _module(char_tokenizer, depth=1, loss={**LOSS, "teacher_temperature": 0.0})


def test_mtp_lambda_schedule(char_tokenizer):
    mod = _module(char_tokenizer, depth=1)

    class _T:  # the two trainer fields the schedule reads
        max_steps = 100
        global_step = 0

    mod._trainer = _T()
    assert mod.mtp_lambda() == 0.25
    _T.global_step = 70
    mod._trainer = _T()
    assert mod.mtp_lambda() == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------ entry point
SMALL = ["model=tiny", "model.arch.hidden_size=32", "model.arch.num_hidden_layers=1", "model.arch.num_attention_heads=2",
         "model.arch.num_key_value_heads=1", "model.arch.intermediate_size=64",
         "data.n_train_per_level=2", "data.n_val_per_level=1", "data.domains=[math,science]", "data.batch_size=8"]
SMALL_TEACHER = ["teacher.model.arch.hidden_size=48", "teacher.model.arch.num_hidden_layers=1",
                 "teacher.model.arch.num_attention_heads=2", "teacher.model.arch.num_key_value_heads=1",
                 "teacher.model.arch.intermediate_size=64"]
TRAIN = ["trainer.max_steps=2", "trainer.log_every_n_steps=1", "callbacks.checkpoint.every_n_train_steps=2"]
CONTRACT = {"train/loss", "train/ce", "train/uld", "train/mtp_ce_d1", "train/mtp_uld_d1"}


def test_entry_point_online_teacher_logs_to_mlflow(tmp_path, mlflow_uri):
    out = tmp_path / "run"
    r = run_module(["kat.train", "+stage=distill", "teacher=tiny", *SMALL, *SMALL_TEACHER, *TRAIN, f"hydra.run.dir={out}"],
                   cwd=tmp_path, env_extra={"MLFLOW_TRACKING_URI": mlflow_uri, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "teacher built from config with random weights" in log
    assert "ULD implementation: torch" in log
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name("embedded")
    (run,) = client.search_runs([exp.experiment_id])
    assert CONTRACT <= set(run.data.metrics), sorted(run.data.metrics)
    assert run.data.params.get("loss/impl_ran", "").startswith("torch")
    final = out / "checkpoints" / "final"
    assert (final / "model.safetensors").exists() and (final / mtp.HEADS_FILE).exists()


def test_entry_point_offline_teacher(tmp_path, compose_cfg):
    from kat import teacher_cache

    cache = tmp_path / "cache"
    cfg = compose_cfg([*SMALL, *SMALL_TEACHER, f"cache.dir={cache}", "cache.k=8", "cache.shard_size=16"], config_name="teacher_cache")
    teacher_cache.write(cfg)
    out = tmp_path / "run"
    r = run_module(["kat.train", "+stage=distill", "teacher=offline", f"teacher.cache_dir={cache}", "teacher.k=8",
                    *SMALL, *TRAIN, "logger=csv", f"hydra.run.dir={out}"], cwd=tmp_path,
                   env_extra={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "uld_loss_topk" in r.stdout + r.stderr
    with open(out / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert CONTRACT <= set(rows[0]), sorted(rows[0])
    vals = [float(r["train/uld"]) for r in rows if r.get("train/uld")]
    assert vals and all(v > 0 for v in vals)  # never a silent zero loss
