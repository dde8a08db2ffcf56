// The pinned `enrich` transform (tests/vectors/enrich/README.md) as a Weir plugin in JavaScript.
//
// World `per-record`: the host writes the batch loop; the plugin is one plain function.
// Results follow the componentize-js convention: return the `ok` value, throw the `err` value.

const TS_MIN = -62135596800;
const TS_MAX = 253402300799;
const VALID_ACTIONS = new Set(["view", "click", "purchase", "add_to_cart"]);
const decoder = new TextDecoder("utf-8", { fatal: true });
const encoder = new TextEncoder();

function invalid(reason) {
  return { tag: "invalid", val: reason };
}

function typeName(value) {
  if (value === null) return "null";
  if (Array.isArray(value)) return "an array";
  switch (typeof value) {
    case "boolean": return "a boolean";
    case "number": return "a number";
    case "string": return "a string";
    default: return "an object";
  }
}

function nonEmptyString(obj, field) {
  if (!Object.prototype.hasOwnProperty.call(obj, field)) throw invalid(`\`${field}\` is missing`);
  const value = obj[field];
  if (typeof value !== "string") throw invalid(`\`${field}\` must be a string, got ${typeName(value)}`);
  if (value === "") throw invalid(`\`${field}\` must not be empty`);
  return value;
}

function timestamp(obj) {
  if (!Object.prototype.hasOwnProperty.call(obj, "ts")) throw invalid("`ts` is missing");
  const ts = obj.ts;
  if (typeof ts !== "number") throw invalid(`\`ts\` must be an integer number of seconds, got ${typeName(ts)}`);
  if (!Number.isInteger(ts)) {
    if (Number.isFinite(ts)) throw invalid(`\`ts\` must be an integer number of seconds, got ${ts}`);
    throw invalid(`\`ts\` ${ts} is out of range (years 0001 to 9999)`);
  }
  if (ts < TS_MIN || ts > TS_MAX) throw invalid(`\`ts\` ${ts} is out of range (years 0001 to 9999)`);
  return ts;
}

function fnv1a32(bytes) {
  let hash = 0x811c9dc5;
  for (const b of bytes) hash = Math.imul(hash ^ b, 0x01000193) >>> 0;
  return hash;
}

// Days since 1970-01-01 of a proleptic Gregorian date, and the year of a day number
// (Howard Hinnant's algorithms; exact integer arithmetic on doubles below 2^53).
function daysFromCivil(y, m, d) {
  y -= m <= 2 ? 1 : 0;
  const era = Math.floor(y / 400);
  const yoe = y - era * 400;
  const doy = Math.floor((153 * ((m + 9) % 12) + 2) / 5) + d - 1;
  const doe = yoe * 365 + Math.floor(yoe / 4) - Math.floor(yoe / 100) + doy;
  return era * 146097 + doe - 719468;
}

function yearOf(days) {
  const z = days + 719468;
  const era = Math.floor(z / 146097);
  const doe = z - era * 146097;
  const yoe = Math.floor((doe - Math.floor(doe / 1460) + Math.floor(doe / 36524) - Math.floor(doe / 146096)) / 365);
  const doy = doe - (365 * yoe + Math.floor(yoe / 4) - Math.floor(yoe / 100));
  const mp = Math.floor((5 * doy + 2) / 153);
  return yoe + era * 400 + (mp >= 10 ? 1 : 0);
}

function cohort(ts) {
  const days = Math.floor(ts / 86400);
  const weekday = (((days + 3) % 7) + 7) % 7; // Monday = 0
  const thursday = days - weekday + 3;
  const year = yearOf(thursday);
  const week = Math.floor((thursday - daysFromCivil(year, 1, 1)) / 7) + 1;
  return `${String(year).padStart(4, "0")}-W${String(week).padStart(2, "0")}`;
}

function enrich(value) {
  let obj;
  try {
    obj = JSON.parse(decoder.decode(value));
  } catch (e) {
    throw invalid(`malformed JSON: ${e.message}`);
  }
  if (obj === null || typeof obj !== "object" || Array.isArray(obj)) {
    throw invalid(`the value must be a JSON object, got ${typeName(obj)}`);
  }
  nonEmptyString(obj, "id");
  const userId = nonEmptyString(obj, "user_id");
  const ts = timestamp(obj);
  obj.segment = `seg-${fnv1a32(encoder.encode(userId)) % 10}`;
  obj.cohort = cohort(ts);
  obj.action_valid = typeof obj.action === "string" && VALID_ACTIONS.has(obj.action);
  return encoder.encode(JSON.stringify(obj));
}

export const recordTransform = {
  init(_config) {},
  transform(record) {
    return [{ value: enrich(record.value), headers: [] }];
  },
};
