"""kat.chat under a pseudo-terminal: a turn in each mode (/on, /off, /auto), judge/thinking/answer panels and
the token count on screen; plus the per-part token counter."""
from __future__ import annotations

import os
import random
import re
import sys

import pytest
import torch

from kat.data import templates

pexpect = pytest.importorskip("pexpect")

TARGETS = {  # what the fixture model says, whatever the question
    "off": "<judge>easy</judge><think_off><answer>7</answer>",
    "on": "<judge>easy</judge><think_on><think>3+4=7</think><answer>7</answer>",
}
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[()][A-Za-z0-9]|\r")


@pytest.fixture(scope="module")
def parrot_dir(tmp_path_factory):
    """A tiny model fitted (seconds) to answer every prompt, after any history, with TARGETS[on|off]."""
    from kat import models
    from kat.models.tokenizer import render_prompt

    torch.manual_seed(0)
    arch = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, max_position_embeddings=512, tie_word_embeddings=True)
    model, tok = models.load({"arch": arch})
    rng = random.Random(0)

    def text(n):
        return "".join(rng.choice("abcdefgh0123+?") for _ in range(rng.randint(1, n)))

    def example():
        msgs = []
        for _ in range(rng.randint(0, 2)):
            msgs += [{"role": "user", "content": text(10)}, {"role": "assistant", "content": "7"}]
        msgs.append({"role": "user", "content": text(12)})
        p = tok.encode(render_prompt(tok, msgs), add_special_tokens=False)
        y = tok.encode(TARGETS[rng.choice(["on", "off"])], add_special_tokens=False) + [tok.eos_token_id]
        return p + y, [-100] * len(p) + y

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        batch = [example() for _ in range(16)]
        n = max(len(x) for x, _ in batch)
        ids = torch.full((16, n), tok.pad_token_id)  # (B, T)
        labels = torch.full((16, n), -100)  # (B, T)
        mask = torch.zeros((16, n), dtype=torch.long)  # (B, T)
        for i, (x, y) in enumerate(batch):
            ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return str(models.save(model, tok, tmp_path_factory.mktemp("parrot") / "model"))


def test_split_token_counts(char_tokenizer):
    from kat.chat import split_token_counts

    assert all(templates.parse(t).well_formed for t in TARGETS.values())
    ids = char_tokenizer.encode(TARGETS["on"], add_special_tokens=False) + [char_tokenizer.eos_token_id]
    c = split_token_counts(ids, char_tokenizer, prompt_tokens=9)
    # judge: <judge> e a s y </judge> <think_on> = 7; thinking: <think> 3 + 4 = 7 </think> = 7; answer: 3
    assert (c.total, c.judge, c.thinking, c.answer, c.prompt) == (len(ids), 7, 7, 3, 9)
    off = split_token_counts(char_tokenizer.encode(TARGETS["off"], add_special_tokens=False), char_tokenizer)
    assert (off.judge, off.thinking, off.answer) == (7, 0, 3)


def _turn(child, prompt_mode: str, line: str, until: str) -> str:
    child.expect_exact(f"you [{prompt_mode}]> ")
    child.sendline(line)
    child.expect(until)
    return ANSI.sub("", child.before + child.after)


def test_chat_under_a_pty_each_mode(parrot_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TERM="xterm-256color", COLUMNS="100", LINES="50")
    child = pexpect.spawn(sys.executable, ["-m", "kat.chat", f"model.path={parrot_dir}", "chat.max_new_tokens=60"],
                          cwd=str(tmp_path), env=env, encoding="utf-8", timeout=180, dimensions=(50, 100))
    try:
        # think-on forced: judge, thinking and answer panels, the forced mode and the token line
        out = _turn(child, "auto", "/on", r"mode: on \(forced after </judge>\)")
        on = _turn(child, "on", "what is 3+4?", r"tokens: \d+ generated[^\n]*\n")
        assert "─ judge " in on and "easy" in on  # panel titles
        assert "mode: think-on (forced)" in on
        assert "─ thinking " in on and "3+4=7" in on
        assert "─ answer " in on
        m = re.search(r"tokens: (\d+) generated \(judge (\d+), thinking (\d+), answer (\d+)\) · prompt (\d+)", on)
        assert m and [int(x) for x in m.groups()[:4]] == [17, 7, 7, 3], on  # TARGETS["on"]: stops at </answer>

        # think-off forced: no thinking panel
        _turn(child, "on", "/off", r"mode: off \(forced after </judge>\)")
        off = _turn(child, "off", "and 1+1?", r"tokens: \d+ generated[^\n]*\n")
        assert "mode: think-off (forced)" in off and "─ answer " in off and "─ thinking " not in off
        assert re.search(r"tokens: \d+ generated \(judge 7, thinking 0, answer 3\)", off), off
        prompt_tokens = [int(x) for x in re.findall(r"prompt (\d+)", on + off)]
        assert prompt_tokens[1] > prompt_tokens[0]  # multi-turn: the first exchange is in the second prompt

        # auto: the model's own choice
        _turn(child, "off", "/auto", r"mode: auto")
        auto = _turn(child, "auto", "hi", r"tokens: \d+ generated[^\n]*\n")
        assert "(chosen by the model)" in auto and "─ judge " in auto and "─ answer " in auto

        _turn(child, "auto", "/quit", r"bye")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, out


def test_history_is_kept_then_trimmed_to_the_context(parrot_dir):
    from omegaconf import OmegaConf

    from kat import models
    from kat.chat import ChatSession

    model, tok = models.load({"path": parrot_dir})
    s = ChatSession(model, tok, OmegaConf.create({"mode": "off", "max_new_tokens": 30, "history": "answer"}))
    parsed, comp, tokens, _ = s.reply("ab")
    assert parsed.mode == "off" and parsed.answer == "7"
    assert s.messages == [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "7"}]
    s.context = 40  # pretend a short context: 40 - min(30, 20) leaves 20 prompt tokens
    for q in ("cd", "ef", "gh"):
        _, comp, tokens, _ = s.reply(q)
        assert tokens.prompt <= 20 and comp.n_tokens <= 30
    assert len(s.messages) < 8 and s.messages[-2]["content"] == "gh"  # oldest turns dropped, newest kept
    s.history_kind = "none"
    s.messages = []
    s.reply("ab")
    assert s.messages == []
