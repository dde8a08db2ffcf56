"""The pinned `enrich` transform (tests/vectors/enrich/README.md) as a Weir plugin in Python.

World `batch`: the loop over records is one line of Python, and a batch crosses the
component boundary once instead of once per record, which matters for an interpreter.
"""
import datetime
import json

from wit_world import exports
from weir_events import event, results

VALID_ACTIONS = {"view", "click", "purchase", "add_to_cart"}
EPOCH = datetime.date(1970, 1, 1)


def fnv1a32(data: bytes) -> int:
    h = 0x811C9DC5
    for b in data:
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def cohort(ts: int) -> str:
    year, week, _ = (EPOCH + datetime.timedelta(days=ts // 86400)).isocalendar()
    return f"{year:04d}-W{week:02d}"


def enrich(value: bytes) -> bytes:
    obj, user_id, ts = event(value)
    action = obj.get("action")
    obj["segment"] = f"seg-{fnv1a32(user_id.encode('utf-8')) % 10}"
    obj["cohort"] = cohort(ts)
    obj["action_valid"] = isinstance(action, str) and action in VALID_ACTIONS
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class BatchTransform(exports.BatchTransform):
    def init(self, config):
        return None

    def transform_batch(self, records):
        return results(records, lambda value: [enrich(value)])
