"""A1111's prompt editing and alternation: which prompt text the model reads at each sampler step.

`[from:to:when]` reads `from` until step `when`, then `to`; `[to:when]` adds `to` from then on and
`[from::when]` drops `from`. A `when` with a decimal point is a fraction of the steps (0.5: halfway), else a
step number. `[a|b|c]` alternates: another option each step. Both nest, and both work in the negative prompt.
Everything else, attention brackets included, is left as text for prompts.parse_attention.

Steps are counted as stable-diffusion-webui counts them, so a prompt pasted from an A1111 infotext switches at
the same step here: from 0, with the text before a `when` of 10 read through step 10, and alternation
starting with its first option twice. Anything that is not well formed stays text, as in A1111. Its older rule
(Use old prompt editing timelines) reads a `when` below 1 as a fraction and any other as a step number.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# A number as A1111's grammar reads it (with optional spaces around it); its decimal point matters.
_WHEN = re.compile(r"\s*([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*")
# Brackets nested deeper than this are read as text: the parser recurses, and no real prompt goes near it.
MAX_NESTING = 40


@dataclass(frozen=True)
class Edit:
    """[before:after:when]"""
    before: tuple
    after: tuple
    when: str  # as written: its decimal point decides between a step and a fraction of the steps


@dataclass(frozen=True)
class Alternation:
    """[a|b|c]"""
    options: tuple


@dataclass(frozen=True)
class PromptPhase:
    """The prompt and negative prompt read from the previous phase's last step + 1 to `last_step` (from 0)."""
    last_step: int
    prompt: str
    negative: str


@dataclass(frozen=True)
class _Clock:
    """How a `when` becomes a step of this pass. The hires fix's second pass counts on from the first, as A1111
    counts it: a step number past the first pass's steps, a fraction past 1.0 (0.5 has passed; 1.5 is halfway).
    A1111's old timelines (`old`): below 1 a fraction, else a step number, decimal point or not; the hires fix's
    second pass reads its texts on the first pass's clock."""
    steps: int
    step_offset: int = 0
    fraction_offset: float = 0.0
    old: bool = False

    def switch_step(self, when: str) -> int:
        if self.old:
            value = float(when) * self.steps if float(when) < 1 else float(when)
        elif "." in when:
            value = (float(when) - self.fraction_offset) * self.steps
        else:
            value = float(when) - self.step_offset
        return int(max(-1.0, min(float(self.steps), value)))  # clamped first: "1e999" is infinite


def _clock(steps: int, first_pass_steps: int | None, old: bool) -> _Clock:
    if old:
        return _Clock(first_pass_steps or steps, old=True)
    return _Clock(steps) if first_pass_steps is None else _Clock(steps, first_pass_steps, 1.0)


def prompt_phases(prompt: str, negative: str, steps: int, first_pass_steps: int | None = None,
                  old_timelines: bool = False) -> list[PromptPhase]:
    """The texts a run of `steps` reads, phase by phase; one phase when nothing is edited or alternated.
    first_pass_steps: this is the hires fix's second pass, after a first pass of that many steps. old_timelines:
    A1111's Use old prompt editing timelines."""
    clock = _clock(steps, first_pass_steps, old_timelines)
    trees = _parsed(prompt), _parsed(negative)
    ends = {clock.steps} | _switch_steps(trees[0], clock) | _switch_steps(trees[1], clock)
    phases: list[PromptPhase] = []
    for end in sorted(ends):
        texts = [_text_at(tree, end, clock) for tree in trees]
        if phases and [phases[-1].prompt, phases[-1].negative] == texts:
            phases.pop()  # the same texts go on: one phase, ending at `end`
        phases.append(PromptPhase(end, *texts))
    if old_timelines and steps > clock.steps:  # A1111 reads a step past its schedule's end with the first texts
        phases.append(PromptPhase(steps, phases[0].prompt, phases[0].negative))
    return phases


def phase_at(phases: list[PromptPhase], step: int) -> int:
    """The index of the phase that step `step` (from 0) reads. As in A1111, steps past the last phase's end
    (a sampler may run more model calls than steps) read the last phase here, not the first."""
    return next((index for index, phase in enumerate(phases) if step <= phase.last_step), len(phases) - 1)


def prompt_variants(text: str, steps: int) -> list[str]:
    """Every text a prompt reads during a run of `steps` (the token counter shows the longest, as A1111's does)."""
    return list(dict.fromkeys(phase.prompt for phase in prompt_phases(text, "", steps)))


def _switch_steps(nodes: tuple, clock: _Clock) -> set[int]:
    found: set[int] = set()
    for node in nodes:
        if isinstance(node, Edit):
            step = clock.switch_step(node.when)
            if step >= 1:
                found.add(step)
            found |= _switch_steps(node.before, clock) | _switch_steps(node.after, clock)
        elif isinstance(node, Alternation):
            found.update(range(1, clock.steps + 1))
            for option in node.options:
                found |= _switch_steps(option, clock)
    return found


def _text_at(nodes: tuple, step: int, clock: _Clock) -> str:
    parts = []
    for node in nodes:
        if isinstance(node, Edit):
            parts.append(_text_at(node.before if step <= clock.switch_step(node.when) else node.after, step, clock))
        elif isinstance(node, Alternation):
            parts.append(_text_at(node.options[(step - 1) % len(node.options)], step, clock))
        else:
            parts.append(node)
    return "".join(parts)


def _parsed(text: str) -> tuple:
    """The text's nodes; a text A1111's grammar cannot read (a `|` outside an alternation, as in `{a|b}` from
    a wildcard) is read by A1111 as plain text throughout, its edits included, and so here."""
    parser = _Parser(text)
    nodes = parser.parse()
    return (text,) if parser.stray_pipe else nodes


class _Parser:
    """One pass over the text, no backtracking: a bracket that turns out not to be an edit or an alternation
    keeps what was read inside it, as text."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0
        self.depth = 0
        self.stray_pipe = False  # a "|" that separates no alternation

    def parse(self) -> tuple:
        return self._sequence(stops="")

    def _sequence(self, stops: str) -> tuple:
        """Nodes up to the first unescaped character in `stops` (not taken), or the end of the text."""
        nodes: list = []
        text = self.text
        while self.pos < len(text):
            char = text[self.pos]
            if char in stops:
                break
            if char in "[(" and self.depth < MAX_NESTING:
                self.depth += 1
                nodes.extend(self._square() if char == "[" else self._round())
                self.depth -= 1
            else:
                self.stray_pipe |= char == "|"
                end = min(len(text), self.pos + 2 if char == "\\" else self.pos + 1)  # an escaped character is text
                nodes.append(text[self.pos:end])
                self.pos = end
        return _joined(nodes)

    def _round(self) -> list:
        """( ... ): an attention bracket, text for parse_attention, but an edit may sit inside it. Its `:` and
        `|` are text (a weight), not separators of an edit around it."""
        self.pos += 1
        inner = self._sequence(stops=")")
        if self.pos == len(self.text):
            return ["(", *inner]
        self.pos += 1
        return ["(", *inner, ")"]

    def _square(self) -> list:
        self.pos += 1
        parts, separators = [self._sequence(stops=":|]")], []
        while self.pos < len(self.text) and self.text[self.pos] != "]":
            separators.append(self.text[self.pos])
            self.pos += 1
            parts.append(self._sequence(stops=":|]"))
        closed = self.pos < len(self.text)
        self.pos += closed
        if closed and separators and set(separators) == {"|"}:
            return [Alternation(tuple(parts))]
        when = _WHEN.fullmatch(parts[-1][0]) if len(parts[-1]) == 1 and isinstance(parts[-1][0], str) else None
        if closed and when and separators in ([":"], [":", ":"]):
            before = parts[0] if len(separators) == 2 else ()
            return [Edit(before, parts[-2], when.group(1))]
        self.stray_pipe |= "|" in separators
        text = ["["]  # not an edit: the text as written ([word] is a weight for parse_attention)
        for index, part in enumerate(parts):
            text.extend(part)
            if index < len(separators):
                text.append(separators[index])
        return text + (["]"] if closed else [])


def _joined(nodes: list) -> tuple:
    """Adjacent text pieces joined into one string."""
    joined: list = []
    for node in nodes:
        if isinstance(node, str) and joined and isinstance(joined[-1], str):
            joined[-1] += node
        elif node != "":
            joined.append(node)
    return tuple(joined)
