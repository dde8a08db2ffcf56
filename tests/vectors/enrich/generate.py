#!/usr/bin/env python3
"""Writes input.jsonl and expected.jsonl for the pinned `enrich` spec (README.md here).

The expected side is computed from the spec by this independent implementation (Python's
datetime.isocalendar for ISO weeks, a direct FNV-1a), never by a plugin. Run it again only
when the spec or the cases change, and review the diff.
"""
import datetime
import json
import pathlib

HERE = pathlib.Path(__file__).parent
TS_MIN, TS_MAX = -62135596800, 253402300799
ACTIONS = {"view", "click", "purchase", "add_to_cart"}


def fnv1a32(data: bytes) -> int:
    h = 0x811C9DC5
    for b in data:
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def ts(y, m, d, hh=0, mm=0, ss=0):
    return int(datetime.datetime(y, m, d, hh, mm, ss, tzinfo=datetime.timezone.utc).timestamp())


def cohort(seconds: int) -> str:
    day = datetime.date(1970, 1, 1) + datetime.timedelta(days=seconds // 86400)
    year, week, _ = day.isocalendar()
    return f"{year:04d}-W{week:02d}"


def ok(event):
    out = dict(event)
    out["segment"] = f"seg-{fnv1a32(event['user_id'].encode()) % 10}"
    out["cohort"] = cohort(int(event["ts"]))
    out["action_valid"] = isinstance(event.get("action"), str) and event["action"] in ACTIONS
    return {"output": out}


def bad(reason_contains):
    return {"dead_letter": {"class": "invalid", "reason_contains": reason_contains}}


def ev(i, user, t, **extra):
    return {"id": f"v{i}", "user_id": user, "ts": t, **extra}


cases = []  # (raw input line, expected)
valid = [
    ev(1, "alice", ts(2024, 1, 1), action="view"),
    ev(2, "bob", ts(2023, 12, 31, 23, 59, 59), action="click"),        # Sunday: 2023-W52
    ev(3, "carol", ts(2021, 1, 3), action="purchase"),                 # 2020 has 53 weeks
    ev(4, "dave", ts(2020, 12, 31, 12), action="add_to_cart"),         # 2020-W53
    ev(5, "erin", ts(2019, 12, 30), action="refund"),                  # next year's week 1
    ev(6, "frank", ts(2027, 1, 1)),                                    # 2026-W53, no action
    ev(7, "grace", ts(2016, 1, 3), action=None),                       # 2015-W53, null action
    ev(8, "heidi", ts(2015, 12, 28), action=5),                        # non-string action
    ev(9, "ivan", 0, action="VIEW"),                                   # epoch; case matters
    ev(10, "judy", -1, action="view"),                                 # 1969-12-31 is 1970-W01
    ev(11, "mallory", TS_MIN, action="click"),                         # 0001-W01
    ev(12, "niaj", TS_MAX, action="click"),                            # 9999-W52
    ev(13, "olivia", ts(2008, 12, 29), metadata={"device": {"os": "ios", "v": [1, 2]}, "tags": []}),
    ev(14, "peggy", ts(2010, 1, 3), action="view", segment="old", cohort=7),  # overwritten
    ev(15, "ünïcödé-用户", ts(2032, 12, 27), action="purchase"),        # UTF-8 bytes hashed
    ev(16, "x", ts(2026, 11, 22, 10, 30), action="add_to_cart", price=12.5, qty=3, ok=True),
    ev(17, "alice", 1700000000.0, action="view"),                      # integral float is an integer
]
for e in valid:
    cases.append((json.dumps(e, ensure_ascii=False), ok(e)))

invalid = [
    ("{not json", bad("JSON")),
    ("", None),  # blank lines are skipped by the host: no record, no expectation
    ('"just a string"', bad("object")),
    ("[1, 2, 3]", bad("object")),
    ("null", bad("object")),
    (json.dumps({"user_id": "u", "ts": 1}), bad("id")),
    (json.dumps({"id": "", "user_id": "u", "ts": 1}), bad("id")),
    (json.dumps({"id": 7, "user_id": "u", "ts": 1}), bad("id")),
    (json.dumps({"id": "i1", "ts": 1}), bad("user_id")),
    (json.dumps({"id": "i2", "user_id": "", "ts": 1}), bad("user_id")),
    (json.dumps({"id": "i3", "user_id": ["u"], "ts": 1}), bad("user_id")),
    (json.dumps({"id": "i4", "user_id": None, "ts": 1}), bad("user_id")),
    (json.dumps({"id": "i5", "user_id": "u"}), bad("ts")),
    (json.dumps({"id": "i6", "user_id": "u", "ts": "1700000000"}), bad("ts")),
    (json.dumps({"id": "i7", "user_id": "u", "ts": 1.5}), bad("ts")),
    (json.dumps({"id": "i8", "user_id": "u", "ts": None}), bad("ts")),
    (json.dumps({"id": "i9", "user_id": "u", "ts": True}), bad("ts")),
    (json.dumps({"id": "i10", "user_id": "u", "ts": TS_MAX + 1}), bad("ts")),
    (json.dumps({"id": "i11", "user_id": "u", "ts": TS_MIN - 1}), bad("ts")),
    ('{"id": "i12", "user_id": "u", "ts": 1e300}', bad("ts")),
]
cases.extend(invalid)

with open(HERE / "input.jsonl", "w", encoding="utf-8") as inp, open(HERE / "expected.jsonl", "w", encoding="utf-8") as exp:
    for line, expected in cases:
        inp.write(line + "\n")
        exp.write(("" if expected is None else json.dumps(expected, ensure_ascii=False, sort_keys=True)) + "\n")
