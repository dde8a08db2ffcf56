#!/usr/bin/env python3
"""Writes events.jsonl: 10,000 sample click-stream events for the quick start, with the
mess real streams carry: ~2% malformed or incomplete records and ~3% duplicates (the same
`id` delivered again). Deterministic (fixed seed); run it again only to change the sample."""
import json
import pathlib
import random

rng = random.Random(42)
ACTIONS = ["view", "click", "purchase", "add_to_cart", "share", None]
lines, ids = [], []
start = 1_767_225_600  # 2026-01-01T00:00:00Z
while len(lines) < 10_000:
    roll = rng.random()
    if roll < 0.02:
        lines.append(rng.choice([
            '{"id": "broken", "user_id": ',                          # truncated JSON
            json.dumps({"id": f"x{len(lines)}", "ts": start}),       # no user_id
            json.dumps({"id": f"x{len(lines)}", "user_id": "u1", "ts": "yesterday"}),
            json.dumps([1, 2, 3]),
        ]))
    elif roll < 0.05 and ids:
        lines.append(lines[rng.choice(ids)])                         # redelivered event
    else:
        event = {
            "id": f"evt-{len(lines):05d}",
            "user_id": f"user-{rng.randrange(500)}",
            "ts": start + rng.randrange(365 * 86_400),
            "metadata": {"page": f"/p/{rng.randrange(50)}", "ms": rng.randrange(2_000)},
        }
        action = rng.choice(ACTIONS)
        if action is not None:
            event["action"] = action
        ids.append(len(lines))
        lines.append(json.dumps(event))
(pathlib.Path(__file__).parent / "events.jsonl").write_text("\n".join(lines) + "\n")
