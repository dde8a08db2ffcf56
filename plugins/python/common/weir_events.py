"""What the example plugins share: reading an event with `enrich`'s checks
(tests/vectors/enrich/README.md), reasons naming the field, and the batch export's results
of a transform from a value to output values."""
import json

from componentize_py_types import Err, Ok
from wit_world.imports.types import Output, TransformError_Invalid

TS_MIN, TS_MAX = -62135596800, 253402300799


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


def event(value: bytes):
    """The event's object, with its `user_id` and `ts`; raises Invalid naming the field."""
    try:
        obj = json.loads(value.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise Invalid(f"malformed JSON: {e}")
    if not isinstance(obj, dict):
        raise Invalid(f"the value must be a JSON object, got {type_name(obj)}")
    non_empty_string(obj, "id")
    user_id = non_empty_string(obj, "user_id")
    ts = timestamp(obj)
    return obj, user_id, ts


def results(records, transform):
    """One result per record: Ok with an output per value `transform` returns, or `invalid`
    with the reason when it raises Invalid."""
    out = []
    for record in records:
        try:
            values = transform(record.value)
            out.append(Ok([Output(destination=None, key=None, value=v, headers=[]) for v in values]))
        except Invalid as e:
            out.append(Err(TransformError_Invalid(str(e))))
    return out

