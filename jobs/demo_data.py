"""Offline demo task: posting-time recommendations (after seed 000's Flan-T5 task).

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
