// The pinned `enrich` transform (tests/vectors/enrich/README.md) as a Weir plugin in C.
//
// World `per-record`: one record per call keeps memory ownership simple in C (every list
// the plugin returns is malloc'ed and freed by the generated post-return code).
//
// There is no JSON library in the C standard library, so this file carries a small strict
// JSON scanner: it validates the whole value (RFC 8259 grammar, UTF-8), reads the top-level
// members of the object, and builds the output by copying each member's original text and
// appending the three new fields. The host compares outputs as canonical JSON, so the
// original spacing and number spelling do not matter. Of repeated keys, the last one counts.

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "per_record.h"

#define TS_MIN (-62135596800LL)
#define TS_MAX (253402300799LL)
#define MAX_DEPTH 128
#define MAX_MEMBERS 1024

// ---------------------------------------------------------------- growable byte buffer

typedef struct {
    uint8_t *ptr;
    size_t len, cap;
} buf_t;

static void buf_push(buf_t *b, const void *data, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 256;
        while (cap < b->len + n) cap *= 2;
        b->ptr = realloc(b->ptr, cap);
        if (!b->ptr) abort();
        b->cap = cap;
    }
    memcpy(b->ptr + b->len, data, n);
    b->len += n;
}

static void buf_str(buf_t *b, const char *s) { buf_push(b, s, strlen(s)); }

// ---------------------------------------------------------------- the scanner

typedef enum { J_NULL, J_BOOL, J_NUMBER, J_STRING, J_ARRAY, J_OBJECT } jtype_t;

typedef struct {
    const uint8_t *p, *start, *end;
    char error[160];
} scan_t;

typedef struct {
    const uint8_t *key_start, *key_end;     // raw key text, quotes included
    buf_t key;                              // unescaped key
    const uint8_t *value_start, *value_end; // raw value text
    jtype_t type;
} member_t;

static bool fail(scan_t *s, const char *what) {
    if (!s->error[0]) snprintf(s->error, sizeof s->error, "%s at byte %zu", what, (size_t)(s->p - s->start));
    return false;
}

static void skip_ws(scan_t *s) {
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r')) s->p++;
}

static void put_utf8(buf_t *out, uint32_t c) {
    uint8_t b[4];
    size_t n;
    if (c < 0x80) { b[0] = (uint8_t)c; n = 1; }
    else if (c < 0x800) { b[0] = 0xC0 | (c >> 6); b[1] = 0x80 | (c & 0x3F); n = 2; }
    else if (c < 0x10000) { b[0] = 0xE0 | (c >> 12); b[1] = 0x80 | ((c >> 6) & 0x3F); b[2] = 0x80 | (c & 0x3F); n = 3; }
    else { b[0] = 0xF0 | (c >> 18); b[1] = 0x80 | ((c >> 12) & 0x3F); b[2] = 0x80 | ((c >> 6) & 0x3F); b[3] = 0x80 | (c & 0x3F); n = 4; }
    if (out) buf_push(out, b, n);
}

static bool hex4(scan_t *s, uint32_t *v) {
    *v = 0;
    for (int i = 0; i < 4; i++) {
        if (s->p >= s->end) return fail(s, "unterminated escape");
        uint8_t c = *s->p++;
        *v <<= 4;
        if (c >= '0' && c <= '9') *v |= c - '0';
        else if (c >= 'a' && c <= 'f') *v |= c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') *v |= c - 'A' + 10;
        else return fail(s, "bad \\u escape");
    }
    return true;
}

// One UTF-8 character of a string body (already known not to be '"' or '\\').
static bool utf8_char(scan_t *s, buf_t *out) {
    const uint8_t *p = s->p;
    uint8_t c = *p;
    size_t n;
    uint32_t min;
    if (c < 0x20) return fail(s, "control character in string");
    if (c < 0x80) { n = 1; min = 0; }
    else if ((c & 0xE0) == 0xC0) { n = 2; min = 0x80; }
    else if ((c & 0xF0) == 0xE0) { n = 3; min = 0x800; }
    else if ((c & 0xF8) == 0xF0) { n = 4; min = 0x10000; }
    else return fail(s, "invalid UTF-8");
    if ((size_t)(s->end - p) < n) return fail(s, "invalid UTF-8");
    uint32_t cp = n == 1 ? c : (c & (0x7F >> n));
    for (size_t i = 1; i < n; i++) {
        if ((p[i] & 0xC0) != 0x80) return fail(s, "invalid UTF-8");
        cp = (cp << 6) | (p[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return fail(s, "invalid UTF-8");
    if (out) buf_push(out, p, n);
    s->p += n;
    return true;
}

// A string; `out` (optional) receives the unescaped UTF-8 bytes.
static bool scan_string(scan_t *s, buf_t *out) {
    if (s->p >= s->end || *s->p != '"') return fail(s, "expected a string");
    s->p++;
    for (;;) {
        if (s->p >= s->end) return fail(s, "unterminated string");
        uint8_t c = *s->p;
        if (c == '"') { s->p++; return true; }
        if (c != '\\') { if (!utf8_char(s, out)) return false; continue; }
        s->p++;
        if (s->p >= s->end) return fail(s, "unterminated escape");
        uint8_t e = *s->p++;
        const char *simple = NULL;
        switch (e) {
            case '"': simple = "\""; break;
            case '\\': simple = "\\"; break;
            case '/': simple = "/"; break;
            case 'b': simple = "\b"; break;
            case 'f': simple = "\f"; break;
            case 'n': simple = "\n"; break;
            case 'r': simple = "\r"; break;
            case 't': simple = "\t"; break;
            case 'u': {
                uint32_t cp;
                if (!hex4(s, &cp)) return false;
                if (cp >= 0xD800 && cp <= 0xDBFF) {
                    uint32_t lo;
                    if (s->end - s->p < 2 || s->p[0] != '\\' || s->p[1] != 'u') return fail(s, "lone surrogate");
                    s->p += 2;
                    if (!hex4(s, &lo)) return false;
                    if (lo < 0xDC00 || lo > 0xDFFF) return fail(s, "lone surrogate");
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                    return fail(s, "lone surrogate");
                }
                put_utf8(out, cp);
                continue;
            }
            default: return fail(s, "bad escape");
        }
        if (out) buf_push(out, simple, 1);
    }
}

static bool digits(scan_t *s) {
    const uint8_t *from = s->p;
    while (s->p < s->end && *s->p >= '0' && *s->p <= '9') s->p++;
    return s->p > from;
}

static bool scan_number(scan_t *s) {
    if (s->p < s->end && *s->p == '-') s->p++;
    if (s->p < s->end && *s->p == '0') s->p++;
    else if (!(s->p < s->end && *s->p >= '1' && *s->p <= '9') || !digits(s)) return fail(s, "bad number");
    if (s->p < s->end && *s->p == '.') { s->p++; if (!digits(s)) return fail(s, "bad number"); }
    if (s->p < s->end && (*s->p == 'e' || *s->p == 'E')) {
        s->p++;
        if (s->p < s->end && (*s->p == '+' || *s->p == '-')) s->p++;
        if (!digits(s)) return fail(s, "bad number");
    }
    return true;
}

static bool literal(scan_t *s, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(s->end - s->p) < n || memcmp(s->p, word, n) != 0) return fail(s, "unexpected character");
    s->p += n;
    return true;
}

static bool scan_value(scan_t *s, int depth, jtype_t *type, member_t *members, size_t *count);

static bool scan_container(scan_t *s, int depth, bool object, member_t *members, size_t *count) {
    if (depth > MAX_DEPTH) return fail(s, "nested too deeply");
    s->p++; // '{' or '['
    skip_ws(s);
    uint8_t close = object ? '}' : ']';
    if (s->p < s->end && *s->p == close) { s->p++; return true; }
    for (;;) {
        skip_ws(s);
        member_t *m = NULL;
        if (object) {
            if (members && *count < MAX_MEMBERS) {
                m = &members[(*count)++];
                memset(m, 0, sizeof *m);
            }
            const uint8_t *key_start = s->p;
            if (!scan_string(s, m ? &m->key : NULL)) return false;
            if (m) { m->key_start = key_start; m->key_end = s->p; }
            skip_ws(s);
            if (s->p >= s->end || *s->p != ':') return fail(s, "expected ':'");
            s->p++;
            skip_ws(s);
        }
        jtype_t type;
        const uint8_t *value_start = s->p;
        if (!scan_value(s, depth + 1, &type, NULL, NULL)) return false;
        if (m) { m->value_start = value_start; m->value_end = s->p; m->type = type; }
        skip_ws(s);
        if (s->p < s->end && *s->p == ',') { s->p++; continue; }
        if (s->p < s->end && *s->p == close) { s->p++; return true; }
        return fail(s, object ? "expected ',' or '}'" : "expected ',' or ']'");
    }
}

// A value; for the top-level object, `members` receives its members.
static bool scan_value(scan_t *s, int depth, jtype_t *type, member_t *members, size_t *count) {
    skip_ws(s);
    if (s->p >= s->end) return fail(s, "unexpected end of input");
    switch (*s->p) {
        case '{': *type = J_OBJECT; return scan_container(s, depth, true, members, count);
        case '[': *type = J_ARRAY; return scan_container(s, depth, false, NULL, NULL);
        case '"': *type = J_STRING; return scan_string(s, NULL);
        case 't': *type = J_BOOL; return literal(s, "true");
        case 'f': *type = J_BOOL; return literal(s, "false");
        case 'n': *type = J_NULL; return literal(s, "null");
        default: *type = J_NUMBER; return scan_number(s);
    }
}

// ---------------------------------------------------------------- enrich

static const char *type_name(jtype_t t) {
    switch (t) {
        case J_NULL: return "null";
        case J_BOOL: return "a boolean";
        case J_NUMBER: return "a number";
        case J_STRING: return "a string";
        case J_ARRAY: return "an array";
        default: return "an object";
    }
}

static bool key_is(const member_t *m, const char *key) {
    size_t n = strlen(key);
    return m->key.len == n && memcmp(m->key.ptr, key, n) == 0;
}

// The member that counts for `key`: the last one.
static const member_t *find(const member_t *members, size_t count, const char *key) {
    for (size_t i = count; i-- > 0;)
        if (key_is(&members[i], key)) return &members[i];
    return NULL;
}

static uint32_t fnv1a32(const uint8_t *p, size_t n) {
    uint32_t h = 0x811c9dc5u;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x01000193u;
    return h;
}

static long long floor_div(long long a, long long b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0))); }

static long long days_from_civil(long long y, long long m, long long d) {
    y -= m <= 2;
    long long era = floor_div(y, 400), yoe = y - era * 400;
    long long doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    return era * 146097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719468;
}

static long long year_of(long long days) {
    long long z = days + 719468, era = floor_div(z, 146097), doe = z - era * 146097;
    long long yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    long long doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    long long mp = (5 * doy + 2) / 153;
    return yoe + era * 400 + (mp >= 10);
}

static void cohort(long long ts, char out[16]) {
    long long days = floor_div(ts, 86400);
    long long weekday = ((days + 3) % 7 + 7) % 7; // Monday = 0
    long long thursday = days - weekday + 3;
    long long year = year_of(thursday);
    long long week = (thursday - days_from_civil(year, 1, 1)) / 7 + 1;
    snprintf(out, 16, "%04lld-W%02lld", year, week);
}

// Checks that `field` is a non-empty string and puts its unescaped bytes in `value`.
static bool string_field(const member_t *members, size_t count, const char *field, buf_t *value, char *reason, size_t cap) {
    const member_t *m = find(members, count, field);
    if (!m) { snprintf(reason, cap, "`%s` is missing", field); return false; }
    if (m->type != J_STRING) { snprintf(reason, cap, "`%s` must be a string, got %s", field, type_name(m->type)); return false; }
    scan_t s = {.p = m->value_start, .start = m->value_start, .end = m->value_end};
    scan_string(&s, value);
    if (value->len == 0) { snprintf(reason, cap, "`%s` must not be empty", field); return false; }
    return true;
}

static bool timestamp(const member_t *members, size_t count, long long *ts, char *reason, size_t cap) {
    const member_t *m = find(members, count, "ts");
    if (!m) { snprintf(reason, cap, "`ts` is missing"); return false; }
    if (m->type != J_NUMBER) {
        snprintf(reason, cap, "`ts` must be an integer number of seconds, got %s", type_name(m->type));
        return false;
    }
    int n = (int)(m->value_end - m->value_start);
    char text[64];
    snprintf(text, sizeof text, "%.*s", n < 63 ? n : 63, (const char *)m->value_start);
    double d = strtod(text, NULL);
    if (isfinite(d) && d != floor(d)) {
        snprintf(reason, cap, "`ts` must be an integer number of seconds, got %s", text);
        return false;
    }
    if (!isfinite(d) || d < (double)TS_MIN || d > (double)TS_MAX) {
        snprintf(reason, cap, "`ts` %s is out of range (years 0001 to 9999)", text);
        return false;
    }
    *ts = (long long)d;
    return true;
}

// Enriches `in`; on success fills `out` and returns true, else writes the reason.
static bool enrich(const uint8_t *in, size_t len, buf_t *out, char *reason, size_t cap) {
    static member_t members[MAX_MEMBERS];
    size_t count = 0;
    scan_t s = {.p = in, .start = in, .end = in + len};
    jtype_t type;
    bool ok = scan_value(&s, 0, &type, members, &count);
    if (ok) {
        skip_ws(&s);
        if (s.p != s.end) ok = fail(&s, "trailing characters");
    }
    bool result = false;
    buf_t id = {0}, user = {0};
    if (!ok) {
        snprintf(reason, cap, "malformed JSON: %s", s.error);
    } else if (type != J_OBJECT) {
        snprintf(reason, cap, "the value must be a JSON object, got %s", type_name(type));
    } else if (count >= MAX_MEMBERS) {
        snprintf(reason, cap, "the object has more than %d members", MAX_MEMBERS - 1);
    } else {
        long long ts;
        if (string_field(members, count, "id", &id, reason, cap) &&
            string_field(members, count, "user_id", &user, reason, cap) &&
            timestamp(members, count, &ts, reason, cap)) {
            bool action_valid = false;
            const member_t *action = find(members, count, "action");
            if (action && action->type == J_STRING) {
                buf_t a = {0};
                scan_t as = {.p = action->value_start, .start = action->value_start, .end = action->value_end};
                scan_string(&as, &a);
                static const char *valid[] = {"view", "click", "purchase", "add_to_cart"};
                for (size_t i = 0; i < 4; i++)
                    if (a.len == strlen(valid[i]) && memcmp(a.ptr, valid[i], a.len) == 0) action_valid = true;
                free(a.ptr);
            }
            buf_str(out, "{");
            bool first = true;
            for (size_t i = 0; i < count; i++) {
                const member_t *m = &members[i];
                if (key_is(m, "segment") || key_is(m, "cohort") || key_is(m, "action_valid")) continue;
                bool later = false; // a later member with the same (unescaped) key wins
                for (size_t j = i + 1; j < count && !later; j++)
                    later = members[j].key.len == m->key.len && memcmp(members[j].key.ptr, m->key.ptr, m->key.len) == 0;
                if (later) continue;
                if (!first) buf_str(out, ",");
                first = false;
                buf_push(out, m->key_start, (size_t)(m->key_end - m->key_start));
                buf_str(out, ":");
                buf_push(out, m->value_start, (size_t)(m->value_end - m->value_start));
            }
            char fields[96], week[16];
            cohort(ts, week);
            snprintf(fields, sizeof fields, "%s\"segment\":\"seg-%u\",\"cohort\":\"%s\",\"action_valid\":%s}",
                     first ? "" : ",", fnv1a32(user.ptr, user.len) % 10, week, action_valid ? "true" : "false");
            buf_str(out, fields);
            result = true;
        }
    }
    for (size_t i = 0; i < count; i++) free(members[i].key.ptr);
    free(id.ptr);
    free(user.ptr);
    return result;
}

// ---------------------------------------------------------------- the exports

bool exports_weir_transform_record_transform_init(exports_weir_transform_record_transform_config_t *config,
                                                  per_record_string_t *err) {
    (void)err;
    exports_weir_transform_record_transform_config_free(config);
    return true;
}

bool exports_weir_transform_record_transform_transform(
    exports_weir_transform_record_transform_record_t *record,
    exports_weir_transform_record_transform_list_output_t *ret,
    exports_weir_transform_record_transform_transform_error_t *err) {
    char reason[256];
    buf_t out = {0};
    bool ok = enrich(record->value.ptr, record->value.len, &out, reason, sizeof reason);
    exports_weir_transform_record_transform_record_free(record);
    if (!ok) {
        free(out.ptr);
        err->tag = WEIR_TRANSFORM_TYPES_TRANSFORM_ERROR_INVALID;
        per_record_string_dup(&err->val.invalid, reason);
        return false;
    }
    weir_transform_types_output_t *output = calloc(1, sizeof *output);
    if (!output) abort();
    output->value.ptr = out.ptr;
    output->value.len = out.len;
    ret->ptr = output;
    ret->len = 1;
    return true;
}
