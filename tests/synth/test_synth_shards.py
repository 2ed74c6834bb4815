"""kat.synth.shards (torn lines, manifests, fingerprints) and kat.synth.assemble (mix without replacement)."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from kat.synth.assemble import coldstart_items, distill_items, select_mix, share_table
from kat.synth.shards import ShardWriter, StepDir, fingerprint, read_jsonl


def test_torn_last_line_is_cut_and_a_missing_newline_restored(tmp_path):
    p = tmp_path / "shard-00000.jsonl"
    p.write_text('{"id": 1}\n{"id": 2}\n{"id": 3, "mess')  # killed in the middle of a write
    assert [o["id"] for o in read_jsonl(p, repair=True)] == [1, 2]
    assert p.read_text() == '{"id": 1}\n{"id": 2}\n'
    p.write_text('{"id": 1}\n{"id": 2}')  # killed between the object and its newline
    assert [o["id"] for o in read_jsonl(p, repair=True)] == [1, 2]
    assert p.read_text().endswith("}\n")
    p.write_text('{"id": 1}\nnot json\n{"id": 3}\n')  # damage inside the file is not silently skipped
    with pytest.raises(ValueError, match=":2: malformed JSON"):
        read_jsonl(p)


def test_step_dir_resumes_by_id_and_resets_when_settings_change(tmp_path, caplog):
    sd = StepDir(tmp_path, "vote")
    m = sd.prepare(fingerprint({"k": 4}), {"k": 4})
    w = ShardWriter(sd.dir, "shard-00000")
    w.write({"id": "a", "messages": []})
    w.write({"id": "b", "messages": []}, aside=True)
    w.close()
    assert sd.done_ids("shard-00000") == {"a", "b"} and m["complete"] == []
    assert sd.prepare(fingerprint({"k": 4}), {"k": 4})["fingerprint"] == fingerprint({"k": 4})
    assert sd.done_ids("shard-00000") == {"a", "b"}  # same settings: kept
    sd.prepare(fingerprint({"k": 8}), {"k": 8})
    assert sd.done_ids("shard-00000") == set()  # changed settings: redone
    assert "settings changed" in caplog.text and "k" in caplog.text
    assert fingerprint({"k": 4}, "x") != fingerprint({"k": 4}, "y")  # chained with the previous step


def _items(n_on: int, n_off: int) -> list[dict]:
    out = []
    for i in range(n_on + n_off):
        out.append({"id": i, "mode": "on" if i < n_on else "off", "level": 1 + i % 5,
                    "domain": ("math", "code")[i % 2]})
    return out


def test_select_mix_meets_shares_without_replacement():
    items = _items(60, 40)
    got = select_mix(items, {"mode": {"on": 2, "off": 1}}, size=None, seed=0)
    assert len(got) == 90 and len({g["id"] for g in got}) == 90  # 60 on limit 60/(2/3) = 90
    assert Counter(g["mode"] for g in got) == {"on": 60, "off": 30}
    got = select_mix(items, {"mode": {"on": 0.5, "off": 0.5}, "domain": {"math": 0.75, "code": 0.25}}, size=40, seed=1)
    c_mode, c_dom = Counter(g["mode"] for g in got), Counter(g["domain"] for g in got)
    assert len(got) == 40 and c_mode == {"on": 20, "off": 20} and c_dom == {"math": 30, "code": 10}
    assert select_mix(items, {"level": {"1": 1.0}}, size=None, seed=0) == [it for it in items if it["level"] == 1]
    assert len(select_mix(items, None, size=7, seed=0)) == 7 and select_mix(items, None, size=None, seed=0) == items
    assert [g["id"] for g in select_mix(items, None, size=7, seed=0)] == [g["id"] for g in select_mix(items, None, size=7, seed=0)]
    with pytest.raises(ValueError, match="unknown axis"):
        select_mix(items, {"colour": {"red": 1}}, size=None, seed=0)


def test_assembled_samples_and_share_table():
    msgs = [{"role": "user", "content": "1+1"}]
    on = {"id": 1, "messages": msgs, "domain": "math", "level": 4, "mode": "on", "judge": "hard", "thinking": "1+1=2",
          "response": "2", "synth": {"direct": {"response": "2"}}}
    off = {"id": 2, "messages": msgs, "domain": "math", "level": 1, "mode": "off", "judge": "easy", "response": "2"}
    bad = {"id": 3, "messages": msgs, "mode": "on", "judge": "hard", "response": "2"}  # no thinking
    ok, rejected = coldstart_items([on, off, bad])
    assert [o["id"] for o in ok] == [1, 2] and "thinking" in rejected[0][1]
    d = distill_items([on, off])
    assert sorted((x["id"], x["mode"]) for x in d) == [("1:off", "off"), ("1:on", "on"), ("2:off", "off")]
    assert next(x for x in d if x["id"] == "1:off").get("thinking") is None
    t = share_table([on, off])
    assert t["all"] == {"n": 2, "on": 1, "off": 1, "off_share": 0.5}
    assert t["level"]["1"]["off_share"] == 1.0 and t["level"]["4"]["off_share"] == 0.0
    json.dumps(t)
