"""Offline demo tasks: posting-time recommendations (after seed 000's Flan-T5 task), and locker
conversations (multi-turn, the answer depends on the first turn).

Structured fields go in, one recommendation in the requested style comes out. The output
is a deterministic function of the fields, so a small model can learn it in minutes and
the evaluation has one right answer per row.
"""

from __future__ import annotations

import random

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
WINDOWS = (
    ("06:00 - 09:00", "early morning"),
    ("09:00 - 12:00", "mid-morning"),
    ("12:00 - 14:00", "lunchtime"),
    ("13:00 - 17:00", "afternoon"),
    ("18:00 - 21:00", "evening"),
    ("22:00 - 00:00", "late night"),
)
DOMINANCE = ("Unrivaled", "Clear Lead", "Narrow Edge")
SHAPES = {"Sustained Plateau": "steady engagement", "Sharp Spike": "a short, intense burst"}
STYLES = {
    "Urgent": "Post now: {day} {part} ({time}) scores {score}/100, {lead}, with {shape}.",
    "Advisory": "We recommend {day} {part} ({time}): a {score}/100 score, {lead}, with {shape}.",
    "Concise": "{day} {part}, {time}: score {score}, {lead}.",
}
LEADS = {
    "Unrivaled": "far ahead of every other slot",
    "Clear Lead": "clearly ahead of the runner-up",
    "Narrow Edge": "just ahead of the runner-up",
}


def demo_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        day = rng.choice(DAYS)
        time, part = rng.choice(WINDOWS)
        score = rng.randint(40, 99)
        dominance = rng.choice(DOMINANCE)
        shape = rng.choice(tuple(SHAPES))
        style = rng.choice(tuple(STYLES))
        prompt = f"Day: {day}, Time: {time}, Score: {score}, Dominance: {dominance}, Shape: {shape}, Style: {style}"
        output = STYLES[style].format(
            day=day, part=part, time=time, score=score, lead=LEADS[dominance], shape=SHAPES[shape]
        )
        rows.append({"id": f"demo-{i}", "input": prompt, "output": output})
    return rows


COLOURS = ("red", "blue", "green", "yellow", "teal", "orange", "purple", "grey")
SMALL_TALK = tuple((f"What day comes after {day}?", f"{DAYS[(i + 1) % 7]}.") for i, day in enumerate(DAYS))


def demo_conversations(n: int, seed: int) -> list[dict]:
    """Offline multi-turn task (`data.path: demo-chat`): the last answer is a fact from the first turn.

    The user stores a locker's colour and code, chats (0-2 unrelated exchanges), then asks for the
    code or the colour; a model that ignores the history cannot know either.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        colour, code = rng.choice(COLOURS), f"{rng.randint(1000, 9999)}"
        messages = [
            {"role": "user", "content": f"Please remember my locker: the {colour} one, code {code}."},
            {"role": "assistant", "content": f"Noted: the {colour} locker, code {code}."},
        ]
        for question, answer in rng.sample(SMALL_TALK, rng.randint(0, 2)):
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if rng.random() < 0.5:
            messages += [
                {"role": "user", "content": "What was my locker code again?"},
                {"role": "assistant", "content": f"Your {colour} locker code is {code}."},
            ]
        else:
            messages += [
                {"role": "user", "content": "Which locker was it?"},
                {"role": "assistant", "content": f"The {colour} locker, code {code}."},
            ]
        rows.append({"id": f"chat-{i}", "messages": messages})
    return rows
