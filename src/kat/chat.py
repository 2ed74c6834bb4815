"""``python -m kat.chat model.path=DIR`` — an interactive terminal chat with mode control.

Each reply is shown in its parts: the judge rationale, the mode the model ran in (and whether it was
forced), the thinking trace (think-on only) and the answer, then the token count of the turn (generated
tokens split into judge / thinking / answer, and the prompt length). Commands:

==========  =====================================================================================
``/on``     force think-on from now on (the mode token after ``</judge>`` is ``<think_on>``)
``/off``    force think-off from now on
``/auto``   let the model decide again
``/reset``  forget the conversation
``/help``   list the commands
``/quit``   leave (also ``/exit`` or end of input, Ctrl-D)
==========  =====================================================================================

Soft switching needs no command: write a directive such as "DO NOT THINK!!!" or "Think deeper." in the
message (models trained with ``data.directives`` follow it; docs/eval.md).

Multi-turn: earlier turns stay in the prompt (``chat.history``: ``answer`` keeps only the parsed answer
of each assistant turn, as reasoning models usually do; ``full`` keeps judge and thinking; ``none`` makes
every turn stand alone). The oldest turns are dropped when the prompt would leave less than
``min(chat.max_new_tokens, context / 2)`` tokens of the model's context for the reply, and the reply's budget
shrinks to what the context still holds.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import hydra
from omegaconf import DictConfig

from kat.data import templates
from kat.config import CONF_DIR

MODES = ("auto", "on", "off")
HISTORY = ("answer", "full", "none")
HELP = "/on  /off  /auto  (mode)   /reset (forget the conversation)   /help   /quit"


@dataclass
class TurnTokens:
    """Generated tokens of one reply split by part (the mode token counts in ``judge``)."""

    total: int
    judge: int
    thinking: int
    answer: int
    prompt: int


def split_token_counts(token_ids: list[int], tokenizer, prompt_tokens: int = 0) -> TurnTokens:
    """Count the generated tokens of each part: judge (``<judge>``…``</judge>`` + mode token), thinking
    (``<think>``…``</think>``) and answer (``<answer>``…``</answer>``); tokens outside the blocks (stop tokens,
    stray text) count only in ``total``."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in templates.SPECIAL_TOKENS}
    judge = thinking = answer = 0
    section = None
    for t in token_ids:
        if t == ids[templates.JUDGE_OPEN]:
            section = "judge"
        elif t == ids[templates.THINK_OPEN]:
            section = "thinking"
        elif t == ids[templates.ANSWER_OPEN]:
            section = "answer"
        if section == "judge" or t in (ids[templates.THINK_ON], ids[templates.THINK_OFF]):
            judge += 1
        elif section == "thinking":
            thinking += 1
        elif section == "answer":
            answer += 1
        if t in (ids[templates.JUDGE_CLOSE], ids[templates.THINK_CLOSE], ids[templates.ANSWER_CLOSE]):
            section = None
    return TurnTokens(total=len(token_ids), judge=judge, thinking=thinking, answer=answer, prompt=prompt_tokens)


class ChatSession:
    """The conversation state and one reply per :meth:`reply` (no terminal I/O; :func:`repl` draws)."""

    def __init__(self, model, tokenizer, cfg: Any):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.mode = str(cfg.get("mode", "auto"))
        if self.mode not in MODES:
            raise ValueError(f"chat.mode must be auto, on or off, got {self.mode!r}")
        self.history_kind = str(cfg.get("history", "answer"))
        if self.history_kind not in HISTORY:
            raise ValueError(f"chat.history must be one of {HISTORY}, got {self.history_kind!r}")
        self.messages: list[dict] = []
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(tokenizer, "model_max_length", None)
        self.context = int(limit) if limit and limit < 10**8 else None

    def _conversation(self, user_text: str) -> list[dict]:
        system = self.cfg.get("system")
        head = [{"role": "system", "content": str(system)}] if system else []
        past = self.messages if self.history_kind != "none" else []
        return head + past + [{"role": "user", "content": user_text}]

    def prompt_for(self, user_text: str) -> tuple[str, int]:
        """The rendered prompt (oldest turns dropped to fit the context) and its token count."""
        from kat.models.tokenizer import render_prompt

        # room kept for the reply: the budget, but at most half the context (else no history would fit)
        reserve = int(self.cfg.get("max_new_tokens", 512))
        if self.context is not None:
            reserve = min(reserve, self.context // 2)
        while True:
            prompt = render_prompt(self.tokenizer, self._conversation(user_text))
            n = len(self.tokenizer.encode(prompt, add_special_tokens=False))
            if self.context is None or n + reserve <= self.context or not self.messages:
                return prompt, n
            self.messages = self.messages[2:]  # drop the oldest user/assistant pair

    def reply(self, user_text: str):
        """Generate one reply; returns ``(parsed, completion, TurnTokens, seconds)`` and extends the history."""
        from kat.rollout.hf import generate

        prompt, n_prompt = self.prompt_for(user_text)
        budget = int(self.cfg.get("max_new_tokens", 512))
        if self.context is not None:  # a single long message: shrink the budget to what the context holds
            budget = max(1, min(budget, self.context - n_prompt))
        temp = float(self.cfg.get("temperature", 0.0))
        t0 = time.time()
        comp = generate(
            self.model, self.tokenizer, [prompt], max_new_tokens=budget,
            force_mode=None if self.mode == "auto" else self.mode,
            max_judge_tokens=int(self.cfg.get("max_judge_tokens", 64)), do_sample=temp > 0,
            temperature=temp if temp > 0 else 1.0, top_p=float(self.cfg.get("top_p", 1.0)), batch_size=1)[0]
        dt = time.time() - t0
        parsed = templates.parse(comp.text)
        if self.history_kind != "none":
            kept = comp.text if self.history_kind == "full" else (parsed.answer if parsed.answer is not None
                                                                  else _strip_tags(comp.text))
            self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": kept}]
        return parsed, comp, split_token_counts(comp.token_ids, self.tokenizer, n_prompt), dt


def _strip_tags(text: str) -> str:
    for tag in templates.SPECIAL_TOKENS:
        text = text.replace(tag, " ")
    return " ".join(text.split())


def render_reply(console, parsed, comp, tokens: TurnTokens, seconds: float, mode: str) -> None:
    """Draw judge, mode, thinking and answer as separate panels, then the token line."""
    from rich.panel import Panel
    from rich.text import Text

    forced = mode != "auto"
    console.print(Panel(Text(parsed.judge if parsed.judge is not None else "(no judge block)"),
                        title="judge", title_align="left", border_style="yellow"))
    shown = {"on": "think-on", "off": "think-off", None: "no mode token"}[parsed.mode]
    console.print(Text(f"mode: {shown}" + (" (forced)" if forced else " (chosen by the model)"), style="bold magenta"))
    if parsed.mode == "on" or parsed.thinking is not None:
        console.print(Panel(Text(parsed.thinking if parsed.thinking is not None else "(unfinished)"),
                            title="thinking", title_align="left", border_style="blue"))
    if parsed.answer is not None:
        console.print(Panel(Text(parsed.answer), title="answer", title_align="left", border_style="green"))
    else:
        why = "truncated at chat.max_new_tokens" if comp.truncated else "malformed output"
        console.print(Panel(Text(comp.text), title=f"answer missing ({why}); raw output", title_align="left",
                            border_style="red"))
    console.print(Text(f"tokens: {tokens.total} generated (judge {tokens.judge}, thinking {tokens.thinking}, "
                       f"answer {tokens.answer}) · prompt {tokens.prompt} · {seconds:.1f}s"
                       + (" · truncated" if comp.truncated else ""), style="dim"))


def repl(session: ChatSession, console, read=input) -> None:
    """Read a line, run a command or reply, until ``/quit`` or end of input."""
    from rich.text import Text

    console.print(Text(f"kat chat · mode {session.mode} · {HELP}", style="bold"))
    while True:
        try:
            line = read(f"you [{session.mode}]> ")
        except (EOFError, KeyboardInterrupt):
            console.print()
            break
        text = line.strip()
        if not text:
            continue
        cmd = text.lower()
        if cmd in ("/quit", "/exit"):
            break
        if cmd in ("/on", "/off", "/auto"):
            session.mode = cmd[1:]
            console.print(Text(f"mode: {session.mode}" + ("" if session.mode == "auto" else " (forced after </judge>)"),
                               style="bold magenta"))
            continue
        if cmd == "/reset":
            session.messages = []
            console.print(Text("conversation cleared", style="bold"))
            continue
        if cmd == "/help":
            console.print(Text(HELP))
            continue
        if text.startswith("/"):
            console.print(Text(f"unknown command {text.split()[0]}; {HELP}", style="red"))
            continue
        parsed, comp, tokens, dt = session.reply(text)
        render_reply(console, parsed, comp, tokens, dt, session.mode)
    console.print(Text("bye", style="bold"))


@hydra.main(config_path=CONF_DIR, config_name="chat", version_base="1.3")
def main(cfg: DictConfig) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from rich.console import Console

    from kat import models
    from kat.utils import configure_threads

    configure_threads()
    torch.manual_seed(int(cfg.seed))
    dev = str(cfg.chat.device)
    device = torch.device("cuda" if dev == "auto" and torch.cuda.is_available() else ("cpu" if dev == "auto" else dev))
    model, tok = models.load(cfg.model)
    session = ChatSession(model.to(device), tok, cfg.chat)
    try:  # line editing and history for input() on a terminal
        import readline  # noqa: F401
    except ImportError:
        pass
    repl(session, Console(highlight=False))


if __name__ == "__main__":
    main()
