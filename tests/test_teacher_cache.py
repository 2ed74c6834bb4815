"""Offline teacher cache: round trip against the teacher, resume after an interruption, truncated and
corrupt shards name the shard, manifest mismatches are errors, top-k + tail bounds on cached rows, the
vLLM import guard and the ``python -m kat.teacher_cache`` entry point."""
from __future__ import annotations

import json
import os

import pytest
import torch

from kat import teacher_cache as TC
from kat.losses.uld import uld_loss, uld_loss_topk, uld_topk_bounds
from kat.models import teacher as T
from kat.models import topk_cache as C
from kat_testing import run_module

SMALL = ["model.arch.hidden_size=32", "model.arch.num_hidden_layers=1", "model.arch.num_attention_heads=2",
         "model.arch.num_key_value_heads=1", "model.arch.intermediate_size=64",
         "teacher.model.arch.hidden_size=48", "teacher.model.arch.num_hidden_layers=1",
         "teacher.model.arch.num_attention_heads=2", "teacher.model.arch.num_key_value_heads=1",
         "teacher.model.arch.intermediate_size=64",
         "data.n_train_per_level=2", "data.n_val_per_level=1", "data.domains=[math,science]"]


class Interrupted(Exception):
    pass


@pytest.fixture
def make_cfg(compose_cfg, tmp_path):
    def _make(*extra, name="cache"):
        return compose_cfg([*SMALL, f"cache.dir={tmp_path / name}", "cache.k=8", "cache.shard_size=12",
                            "cache.dtype=float32", *extra], config_name="teacher_cache")

    return _make


def _teacher_and_examples(cfg):
    from kat.models import hf

    tok = hf.load_tokenizer(cfg.model)
    torch.manual_seed(int(cfg.seed))
    teacher = T.build_teacher(cfg.teacher, tok, student_rows=len(tok))
    return tok, teacher, TC.training_examples(cfg, tok)


def _full_logprobs(teacher, ex):
    m = teacher.models["single"]
    with torch.no_grad():
        z = m(input_ids=torch.tensor([ex["input_ids"]])).logits[0]  # (L, V)
    pos = T.answer_positions(torch.tensor(ex["labels"]))
    return torch.log_softmax(z[pos, : teacher.columns].float(), -1)  # (R, V)


def test_round_trip_matches_the_teacher(make_cfg):
    cfg = make_cfg()
    path = TC.write(cfg)
    tok, teacher, examples = _teacher_and_examples(cfg)
    man = json.loads((path / C.MANIFEST).read_text())
    assert man["complete"] and man["k"] == 8 and man["n_shards"] == len(man["shards"]) > 1
    assert man["data"] == C.data_fingerprint(examples) and man["tokenizer"] == C.tokenizer_fingerprint(tok)
    reader = C.CacheReader(path)
    for ex in examples[:: max(1, len(examples) // 7)]:
        lp, tail, ids = reader.rows([(torch.tensor(ex["input_ids"]), torch.tensor(ex["labels"]))], with_ids=True)
        full = _full_logprobs(teacher, ex)
        want_lp, want_ids = full.topk(8, -1)
        assert lp.shape == (int((torch.tensor(ex["labels"][1:]) != -100).sum()), 8)
        torch.testing.assert_close(lp, want_lp, rtol=1e-5, atol=1e-5)
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(tail, 1 - want_lp.exp().sum(-1), rtol=1e-5, atol=1e-5)


def test_duplicates_are_stored_once():
    a = {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}
    b = {"input_ids": [1, 2, 4], "labels": [-100, 2, 4]}
    uniq, keys = TC.unique_examples([a, b, dict(a), b])
    assert uniq == [a, b] and len(set(keys)) == 2
    assert C.data_fingerprint([a, b, a]) != C.data_fingerprint([a, b])  # order and multiplicity count


def test_resume_after_interruption(make_cfg, tmp_path):
    cfg = make_cfg()

    def stop_after_first(j):
        raise Interrupted

    with pytest.raises(Interrupted):
        TC.write(cfg, on_shard=stop_after_first)
    d = tmp_path / "cache"
    man = json.loads((d / C.MANIFEST).read_text())
    assert not man["complete"] and list(man["shards"]) == ["shard-00000.safetensors"]
    with pytest.raises(C.CacheError, match="incomplete"):
        C.CacheReader(d)
    (d / "shard-00001.safetensors.tmp-99999").write_bytes(b"partial write of a killed process")
    first = (d / "shard-00000.safetensors").stat().st_mtime_ns

    done = []
    TC.write(cfg, on_shard=done.append)
    assert done == list(range(1, man["n_shards"])), "finished shards must not be recomputed"
    assert (d / "shard-00000.safetensors").stat().st_mtime_ns == first
    assert not list(d.glob("*.tmp-*"))
    # identical to an uninterrupted write
    fresh = TC.write(make_cfg(name="fresh"))
    a, b = json.loads((d / C.MANIFEST).read_text()), json.loads((fresh / C.MANIFEST).read_text())
    assert a["complete"] and {k: v["sha256"] for k, v in a["shards"].items()} == \
        {k: v["sha256"] for k, v in b["shards"].items()}


def test_truncated_or_corrupt_shard_is_named(make_cfg):
    path = TC.write(make_cfg())
    shard = path / "shard-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    for verify in ("checksum", "size"):
        with pytest.raises(C.CacheError, match="shard-00001.safetensors.*truncated"):
            C.CacheReader(path, verify=verify)
    corrupt = bytearray(data)
    corrupt[-5] ^= 0xFF
    shard.write_bytes(bytes(corrupt))
    with pytest.raises(C.CacheError, match="shard-00001.safetensors.*sha256"):
        C.CacheReader(path)
    shard.write_bytes(b"\x00" * len(data))  # right size, not a safetensors file
    with pytest.raises(C.CacheError, match="shard-00001.safetensors.*malformed"):
        C.CacheReader(path, verify="size")


def test_invalid_values_are_an_error_not_a_zero_loss(tmp_path):
    ident = {"teacher": {"single": "x"}, "tokenizer": "t", "k": 2, "temperature": 1.0, "data": "1:d",
             "vocab_columns": 10, "logprob_dtype": "float32"}
    w = C.CacheWriter(tmp_path / "bad", ident, n_examples=1, shard_size=4)
    ids, labels = torch.tensor([5, 6, 7]), torch.tensor([-100, 6, 7])
    w.write_shard(0, keys=torch.tensor([list(C.example_key(ids, labels))], dtype=torch.uint8),
                  offsets=torch.tensor([0, 2]), ids=torch.zeros(2, 2, dtype=torch.int32),
                  logprobs=torch.log(torch.tensor([[0.5, 0.2], [0.6, 0.1]])), tail=torch.tensor([0.3, 2.0]))
    w.close()
    reader = C.CacheReader(tmp_path / "bad")
    with pytest.raises(C.CacheError, match="shard-00000.safetensors.*tail mass"):
        reader.rows([(ids, labels)])
    with pytest.raises(C.CacheError, match="not in the cache"):
        reader.rows([(ids, torch.tensor([-100, -100, 7]))])


def test_manifest_mismatch_is_an_error(make_cfg, tmp_path):
    cfg = make_cfg()
    path = TC.write(cfg)
    with pytest.raises(C.CacheError, match="k: cache has 8, this run has 4"):
        TC.write(make_cfg("cache.k=4"))
    with pytest.raises(C.CacheError, match="temperature"):
        TC.write(make_cfg("cache.temperature=2.0"))
    with pytest.raises(C.CacheError, match="data"):
        TC.write(make_cfg("data.n_train_per_level=3"))
    tok, _, examples = _teacher_and_examples(cfg)
    reader = C.CacheReader(path)
    reader.check(tokenizer=tok, data_fp=C.data_fingerprint(examples), temperature=1.0, k=8)  # the matching run
    with pytest.raises(C.CacheError) as e:
        reader.check(tokenizer=tok, data_fp="7:0000", temperature=2.0, k=16, teacher="dir:other")
    for field in ("data", "temperature", "k", "teacher"):
        assert f"  {field}:" in str(e.value)
    other = tok.__class__.from_pretrained(str(_saved_tokenizer(tok, tmp_path)))
    other.add_tokens(["<new>"])
    with pytest.raises(C.CacheError, match="tokenizer"):
        reader.check(tokenizer=other)
    offline = C.OfflineTeacher(reader, expect_k=16)
    with pytest.raises(C.CacheError, match="k: cache 8"):
        offline.check(tokenizer=tok, data_fp=None, temperature=1.0)


def _saved_tokenizer(tok, tmp_path):
    d = tmp_path / "tok"
    tok.save_pretrained(d)
    return d


def test_topk_tail_bounds_hold_on_cached_rows(make_cfg):
    cfg = make_cfg()
    path = TC.write(cfg)
    _, teacher, examples = _teacher_and_examples(cfg)
    reader = C.CacheReader(path)
    ex = examples[3]
    lp, tail = reader.rows([(torch.tensor(ex["input_ids"]), torch.tensor(ex["labels"]))])
    full = _full_logprobs(teacher, ex)  # (R, V)
    g = torch.Generator().manual_seed(0)
    for scale in (0.5, 2.0, 6.0):
        s = torch.randn(full.shape, generator=g) * scale
        exact = uld_loss(s, full, reduction="none")
        lower, upper = uld_topk_bounds(s, lp, tail)
        assert bool((lower <= exact + 1e-5).all()) and bool((exact <= upper + 1e-5).all())
        torch.testing.assert_close(uld_loss_topk(s, lp, tail, reduction="none"), lower)


def test_vllm_backend_has_a_clean_import_guard():
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match=r"kat\[gpu\]"):
        TC.vllm_topk("/nonexistent", [], k=4, temperature=1.0, vcfg={}, seed=0)


def test_entry_point_writes_and_prints_the_folder(tmp_path):
    out = tmp_path / "cli"
    r = run_module(["kat.teacher_cache", *SMALL, f"cache.dir={out}", "cache.k=4", f"hydra.run.dir={tmp_path / 'h'}"],
                   cwd=tmp_path, env_extra={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == str(out.resolve())
    assert json.loads((out / C.MANIFEST).read_text())["complete"]
    assert os.path.exists(out / "shard-00000.safetensors")
