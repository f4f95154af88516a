"""Conversations: base vs adapter on held-out multi-turn conversations, and the adapter without the history.

    lorafleet train --config configs/chat-smollm2.yaml        # the adapter (runs/chat/adapter)
    python bench/chat_history.py [--config configs/chat-smollm2.yaml] [--adapter runs/chat/adapter]

The config's held-out conversations (its seeded split: 40 of the 400 generated ones), each answered
from the turns before its last assistant turn, scored with SQuAD exact match / F1 against that turn:
- the base model (4-bit, as `lorafleet eval` loads it);
- the adapter (what `lorafleet eval` reports);
- the adapter given only the last user turn: the locker task's answer is in the first turn, so a
  model that ignores the history cannot get it right. This row shows the task needs the history.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def compare(config: str, adapter: Path) -> tuple[int, dict[str, dict]]:
    """Metrics of the base, the adapter, and the adapter without the history, on the config's held-out conversations."""
    import torch

    from jobs.config import load_config
    from jobs.data import held_out_examples
    from jobs.evaluation import evaluate_model
    from jobs.model import attach_adapter, load_base
    from jobs.prompting import Prompting

    run = load_config(config, [])
    examples = held_out_examples(run)
    prompting = Prompting.load(run.model)
    model = load_base(run, torch.device("cpu"), prompting.kind)
    rows = {"base": evaluate_model("base", model, prompting, examples, run).metrics}
    model = attach_adapter(model, adapter)
    rows["adapter"] = evaluate_model("adapter", model, prompting, examples, run).metrics
    last_turn_only = []
    for example in examples:
        messages = json.loads(example["conversation"])
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        last_turn_only.append({**example, "conversation": json.dumps([messages[last - 1], messages[last]])})
    rows["adapter, last user turn only"] = evaluate_model("adapter", model, prompting, last_turn_only, run).metrics
    return len(examples), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/chat-smollm2.yaml")
    parser.add_argument("--adapter", type=Path, default=Path("runs/chat/adapter"))
    args = parser.parse_args()
    count, rows = compare(args.config, args.adapter)
    print(f"\n## {count} held-out conversations ({args.config}, adapter {args.adapter})\n")
    print("| model | exact match | F1 | failed generations |")
    print("|---|---:|---:|---:|")
    for label, m in rows.items():
        print(f"| {label} | {m['exact_match']:.1f} | {m['f1']:.1f} | {m['failed_generations']} |")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(rows, handle, indent=2)
    print(f"\n(metrics: {handle.name})")


if __name__ == "__main__":
    main()
