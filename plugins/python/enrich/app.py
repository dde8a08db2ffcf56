"""The pinned `enrich` transform (tests/vectors/enrich/README.md) as a Weir plugin in Python.

World `batch`: the loop over records is one line of Python, and a batch crosses the
component boundary once instead of once per record, which matters for an interpreter.
"""
import datetime
import json

from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.imports.types import Output, TransformError_Invalid

TS_MIN, TS_MAX = -62135596800, 253402300799
VALID_ACTIONS = {"view", "click", "purchase", "add_to_cart"}
EPOCH = datetime.date(1970, 1, 1)


class Invalid(Exception):
    pass


def type_name(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def non_empty_string(obj, field):
    if field not in obj:
        raise Invalid(f"`{field}` is missing")
    value = obj[field]
    if not isinstance(value, str):
        raise Invalid(f"`{field}` must be a string, got {type_name(value)}")
    if value == "":
        raise Invalid(f"`{field}` must not be empty")
    return value


def timestamp(obj):
    if "ts" not in obj:
        raise Invalid("`ts` is missing")
    ts = obj["ts"]
    if isinstance(ts, bool) or not isinstance(ts, (int, float)):
        raise Invalid(f"`ts` must be an integer number of seconds, got {type_name(ts)}")
    if isinstance(ts, float):
        if not ts.is_integer():
            raise Invalid(f"`ts` must be an integer number of seconds, got {ts}")
        if not TS_MIN <= ts <= TS_MAX:
            raise Invalid(f"`ts` {ts} is out of range (years 0001 to 9999)")
        ts = int(ts)
    if not TS_MIN <= ts <= TS_MAX:
        raise Invalid(f"`ts` {ts} is out of range (years 0001 to 9999)")
    return ts


def fnv1a32(data: bytes) -> int:
    h = 0x811C9DC5
    for b in data:
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def cohort(ts: int) -> str:
    year, week, _ = (EPOCH + datetime.timedelta(days=ts // 86400)).isocalendar()
    return f"{year:04d}-W{week:02d}"


def enrich(value: bytes) -> bytes:
    try:
        obj = json.loads(value.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise Invalid(f"malformed JSON: {e}")
    if not isinstance(obj, dict):
        raise Invalid(f"the value must be a JSON object, got {type_name(obj)}")
    non_empty_string(obj, "id")
    user_id = non_empty_string(obj, "user_id")
    ts = timestamp(obj)
    action = obj.get("action")
    obj["segment"] = f"seg-{fnv1a32(user_id.encode('utf-8')) % 10}"
    obj["cohort"] = cohort(ts)
    obj["action_valid"] = isinstance(action, str) and action in VALID_ACTIONS
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def transform_one(record):
    try:
        return Ok([Output(destination=None, key=None, value=enrich(record.value), headers=[])])
    except Invalid as e:
        return Err(TransformError_Invalid(str(e)))


class BatchTransform(exports.BatchTransform):
    def init(self, config):
        return None

    def transform_batch(self, records):
        return [transform_one(r) for r in records]
