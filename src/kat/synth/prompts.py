"""Editable prompt templates (``synth.prompts.<role>`` in conf/synth/_prompts.yaml).

A template is ``{id, system, user}``. ``{name}`` placeholders are filled from the item and the step (only
known names are replaced, so JSON examples with braces need no escaping). ``user: null`` sends the item's
own conversation (its messages up to the last user turn) with ``system`` prepended: the answering roles
(``direct``, ``solve``) do that, so a multi-turn item is answered as a conversation.

Provenance records a template as ``<id>@<8 hex of the SHA-256 of its text>``: editing a prompt without
changing its id still shows in the records (and in the request cache keys, which hash the text itself).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Mapping

from kat.data import schema

ROLES = ("tag", "direct", "solve", "reflect", "critic", "grade", "rationale")
PLACEHOLDER = re.compile(r"\{(\w+)\}")


def render_query(messages: list[dict]) -> str:
    """The conversation as text for prompts that quote it (``{query}``)."""
    msgs = [m for m in messages if m.get("role") != "system"]
    if len(msgs) == 1:
        return msgs[0]["content"]
    return "\n\n".join(f"[{m['role']}] {m['content']}" for m in msgs)


def fill(template: str, values: Mapping[str, Any]) -> str:
    """Replace ``{name}`` for every ``name`` in ``values``; other braces stay as written."""
    return PLACEHOLDER.sub(lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), template)


@dataclass(frozen=True)
class Prompt:
    """One role's template."""

    id: str
    system: str | None = None
    user: str | None = None

    @staticmethod
    def from_cfg(role: str, node: Mapping[str, Any]) -> "Prompt":
        node = dict(node or {})
        if not node.get("id"):
            raise ValueError(f"synth.prompts.{role}.id is required (it names the template in provenance records)")
        if not node.get("system") and not node.get("user"):
            raise ValueError(f"synth.prompts.{role}: set system and/or user")
        return Prompt(id=str(node["id"]), system=node.get("system"), user=node.get("user"))

    @property
    def ref(self) -> str:
        h = hashlib.sha256(f"{self.system or ''}\x00{self.user or ''}".encode()).hexdigest()[:8]
        return f"{self.id}@{h}"

    def messages(self, item: dict, **values: Any) -> list[dict]:
        """The messages for ``item``: ``system`` + (``user`` filled, or the item's own conversation)."""
        vals = {"query": render_query(schema.prompt_messages(item)), **values}
        out: list[dict] = []
        if self.user is None:
            convo = schema.prompt_messages(item)
            sys_own = [m["content"] for m in convo if m["role"] == "system"]
            rest = [m for m in convo if m["role"] != "system"]
            system = "\n\n".join(x for x in [fill(self.system, vals).strip() if self.system else "", *sys_own] if x)
            if system:
                out.append({"role": "system", "content": system})
            out.extend(rest)
        else:
            if self.system:
                out.append({"role": "system", "content": fill(self.system, vals).strip()})
            out.append({"role": "user", "content": fill(self.user, vals).strip()})
        return out


def load_prompts(node: Mapping[str, Any]) -> dict[str, Prompt]:
    """Every role of :data:`ROLES` from ``synth.prompts``."""
    missing = [r for r in ROLES if r not in node]
    if missing:
        raise ValueError(f"synth.prompts lacks role(s) {missing} (roles: {ROLES})")
    return {r: Prompt.from_cfg(r, node[r]) for r in ROLES}
