"""The evaluation gate of `lorafleet pipeline` with `promote.registry` set: the new adapter is published to the
registry as a new version and made current only if it scores at least as well as the current version on the same
held-out set and metric (`promote.metric`, within `promote.margin`). A refused adapter stays as a version that is
not current: list it (`lorafleet registry list`), ask it by pin (`model: NAME@VERSION`), or force it
(`lorafleet registry rollback REGISTRY NAME --to VERSION`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from jobs import registry, storage
from jobs.config import RunConfig
from jobs.evaluation import EvalOutcome, run_eval


@dataclass(frozen=True)
class GateDecision:
    name: str
    version: int  # the new adapter's version number
    promoted: bool
    metric: str
    score: float  # the new adapter's
    current_score: float | None  # the current version's; None when there was none
    current_version: int | None
    reason: str

    def markdown(self) -> str:
        outcome = "made current" if self.promoted else "published, not current"
        rows = [f"| new adapter (version {self.version}) | {self.score:.4f} |"]
        if self.current_version is not None:
            rows.append(f"| current (version {self.current_version}) | {self.current_score:.4f} |")
        return "\n".join(
            [
                f"## Promotion gate: {self.name} version {self.version} {outcome}",
                "",
                f"| adapter | {self.metric} |",
                "| --- | --- |",
                *rows,
                "",
                f"Decision: {self.reason}.",
            ]
        )


def _local(version: registry.Version) -> Path:
    return storage.fetch(version.uri) if storage.is_remote(version.uri) else Path(version.uri)


def judge(run: RunConfig, score: float, current_score: float) -> tuple[bool, str]:
    """Whether `score` passes against the current version's `current_score`, and the sentence that says why."""
    p = run.promote
    lower = p.lower_is_better()
    passed = score <= current_score + p.margin if lower else score >= current_score - p.margin
    better = "lower" if lower else "higher"
    verdict = "at least as good" if passed else "worse"
    return passed, (
        f"{p.metric} {score:.4f} against {current_score:.4f} ({better} is better, margin {p.margin:g}): "
        f"{verdict}, so {'made current' if passed else 'not made current'}"
    )


def gate(run: RunConfig, adapter: Path, evaluated: EvalOutcome, name: str, eval_dir: Path) -> GateDecision:
    """Score the current version as the new adapter was scored, publish the new one, current if it passes; the
    decision is appended to the eval report."""
    p = run.promote
    score = evaluated.results["adapter"].metrics[p.metric]
    now = registry.current(p.registry, name)
    if now is None:
        promoted, current_score, reason = True, None, "no current version: the first one is made current"
    else:
        theirs = run_eval(run, _local(now), False, eval_dir / f"current-v{now.number}")
        current_score = theirs.results["adapter"].metrics[p.metric]
        promoted, reason = judge(run, score, current_score)
    against = now.number if now else None
    record = {"metric": p.metric, "score": score, "current_score": current_score, "against_version": against}
    published = registry.publish(
        p.registry, name, adapter, keep=p.keep, make_current=promoted, gate=record | {"reason": reason}
    )
    decision = GateDecision(name, published.number, promoted, p.metric, score, current_score, against, reason)
    with evaluated.report.open("a") as report:
        report.write("\n\n" + decision.markdown() + "\n")
    (eval_dir / "gate.json").write_text(json.dumps(asdict(decision), indent=2))
    return decision
