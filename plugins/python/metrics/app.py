"""The pinned `metrics` transform (tests/vectors/metrics/README.md) as a Weir plugin in
Python, with its state kept by the host (world `stateful`: the `state` import).

The host calls a stateful plugin with one record at a time, so each write belongs to one
record: it takes effect only if that record is processed.
"""
import datetime
import json

from wit_world import exports
from wit_world.imports import state
from weir_events import event, results

STAGES = ["view", "add_to_cart", "purchase"]
EPOCH = datetime.date(1970, 1, 1)


def get(key: str):
    value = state.get(key.encode("utf-8"))
    return None if value is None else value.decode("utf-8")


def put(key: str, value: str):
    state.set(key.encode("utf-8"), value.encode("utf-8"))


def dumps(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def metrics(value: bytes):
    obj, user, ts = event(value)
    outputs = []
    count = get(f"count/{user}")
    put(f"count/{user}", str(int(count or 0) + 1))

    day = (EPOCH + datetime.timedelta(days=ts // 86400)).isoformat()
    if get(f"seen/{user}/{day}") is None:
        put(f"seen/{user}/{day}", "1")
        outputs.append({"type": "active_user", "user_id": user, "day": day, "id": obj["id"]})

    action = obj.get("action")
    if isinstance(action, str) and action in STAGES:
        previous = get(f"stage/{user}")
        if previous is None or STAGES.index(action) > STAGES.index(previous):
            put(f"stage/{user}", action)
            outputs.append(
                {"type": "funnel", "user_id": user, "stage": action, "from": previous, "id": obj["id"]}
            )
    return [dumps(o) for o in outputs]


class BatchTransform(exports.BatchTransform):
    def init(self, config):
        return None

    def transform_batch(self, records):
        return results(records, lambda value: metrics(value))
