/* The wire form of answered images, written straight from the server's records.
 *
 * image_results(outcomes, field) -> bytes: every ImageOutcome (infer_server.messages) as an
 * ImageResult (proto/infer.proto), each a length-delimited field `field` of the enclosing message:
 * with field 2, bytes that are SessionReply.results and may be appended to the rest of a
 * serialized SessionReply. The same bytes, parsed, equal what front.session.outcome_to_proto
 * builds with protobuf for the records the server makes (str, int, float, Code, tuples;
 * tests/unit/test_wire.py holds the two together): scalars at their default are left out
 * (proto3), `status` is always present, a detection's `box` too, map entries carry their key and
 * value, floats are IEEE single precision rounded to nearest. A value protobuf would refuse (a
 * negative or too large unsigned, an int32 out of range, a string that is not text) raises here
 * too; some values of the wrong type that protobuf would take (bytes for a string, a map entry
 * as a list) are refused here, and a bool is taken for an integer.
 *
 * Why C: building the results with protobuf's Python API (a message per image, a call per field)
 * and serializing them was the largest single piece of the main process's work per answered
 * image (docs/performance.md).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { VARINT = 0, FIXED32 = 5, DELIMITED = 2 };

typedef struct {
    char *data;
    Py_ssize_t len, cap;
} Buf;

static int reserve(Buf *b, Py_ssize_t more) {
    if (b->len + more <= b->cap) return 0;
    Py_ssize_t cap = b->cap ? b->cap : 1024;
    while (cap < b->len + more) cap *= 2;
    char *data = PyMem_Realloc(b->data, (size_t)cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = data;
    b->cap = cap;
    return 0;
}

static int put_varint(Buf *b, uint64_t v) {
    if (reserve(b, 10)) return -1;
    while (v >= 0x80) {
        b->data[b->len++] = (char)((v & 0x7f) | 0x80);
        v >>= 7;
    }
    b->data[b->len++] = (char)v;
    return 0;
}

static int put_tag(Buf *b, int field, int wire) { return put_varint(b, ((uint64_t)field << 3) | (uint64_t)wire); }

/* A length-delimited field: its tag and one byte for the length now, the length itself once the
 * content is written (`close`), moving the content along when the length needs more bytes. */
static Py_ssize_t open_field(Buf *b, int field) {
    if (put_tag(b, field, DELIMITED) || reserve(b, 1)) return -1;
    b->len += 1;
    return b->len;
}

static int close_field(Buf *b, Py_ssize_t start) {
    uint64_t size = (uint64_t)(b->len - start), v = size;
    int extra = 0;
    while (v >= 0x80) {
        v >>= 7;
        extra++;
    }
    if (extra) {
        if (reserve(b, extra)) return -1;
        memmove(b->data + start + extra, b->data + start, (size_t)size);
        b->len += extra;
    }
    char *p = b->data + start - 1;
    for (v = size; v >= 0x80; v >>= 7) *p++ = (char)((v & 0x7f) | 0x80);
    *p = (char)v;
    return 0;
}

static int put_str(Buf *b, int field, PyObject *value, int always) {
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(value, &n);
    if (s == NULL) return -1;
    if (n == 0 && !always) return 0;
    if (put_tag(b, field, DELIMITED) || put_varint(b, (uint64_t)n) || reserve(b, n)) return -1;
    memcpy(b->data + b->len, s, (size_t)n);
    b->len += n;
    return 0;
}

/* An integer field's value, refused (ValueError) outside [low, high]. */
static int as_integer(PyObject *value, long long low, long long high, const char *type, long long *out) {
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (overflow || v < low || v > high) {
        PyErr_Format(PyExc_ValueError, "value out of range for a %s field: %R", type, value);
        return -1;
    }
    *out = v;
    return 0;
}

static int put_uint32(Buf *b, int field, PyObject *value) {
    long long v;
    if (as_integer(value, 0, UINT32_MAX, "uint32", &v)) return -1;
    if (v == 0) return 0;
    return put_tag(b, field, VARINT) || put_varint(b, (uint64_t)v) ? -1 : 0;
}

static int put_int32(Buf *b, int field, PyObject *value, int always) {
    long long v;
    if (as_integer(value, INT32_MIN, INT32_MAX, "int32", &v)) return -1;
    if (v == 0 && !always) return 0;
    return put_tag(b, field, VARINT) || put_varint(b, (uint64_t)(int64_t)v) ? -1 : 0;
}

static int put_float(Buf *b, int field, PyObject *value, int always) {
    double d = PyFloat_AsDouble(value);
    if (d == -1.0 && PyErr_Occurred()) return -1;
    float f = (float)d;  /* IEEE: to nearest, infinite beyond the largest single */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if (bits == 0 && !always) return 0;  /* -0.0 is written: protobuf compares the bits */
    if (put_tag(b, field, FIXED32) || reserve(b, 4)) return -1;
    for (int i = 0; i < 4; i++) b->data[b->len++] = (char)((bits >> (8 * i)) & 0xff);
    return 0;
}

static PyObject *names[18];
enum {
    BATCH_ID, INDEX, NAME, CODE, MESSAGE, WIDTH, HEIGHT, DETECTIONS, TIMINGS, WORKER, CACHED, MODELS,
    CLASS_ID, LABEL, SCORE, BOX, ATTRIBUTES, MODEL,
};
static const char *const name_strings[18] = {
    "batch_id", "index", "name", "code", "message", "width", "height", "detections", "timings_ms", "worker",
    "cached", "models", "class_id", "label", "score", "box", "attributes", "model",
};
static PyObject *box_names[4];

/* Field `field` of `obj`'s attribute `attr`, written by `put` (one of the above). */
#define PUT_ATTR(put, b, obj, attr, field, ...)                          \
    do {                                                                 \
        PyObject *value_ = PyObject_GetAttr((obj), names[attr]);         \
        if (value_ == NULL) return -1;                                   \
        int failed_ = put((b), (field), value_, ##__VA_ARGS__);          \
        Py_DECREF(value_);                                               \
        if (failed_) return -1;                                          \
    } while (0)

/* Item `i` of the sequence `seq` (from PySequence_Fast), written by `put` while a reference to
 * it is held: for a list, PySequence_Fast lends the list's own items, and the attribute getters
 * and __float__ that `put` may call are Python code that could empty the list meanwhile. */
static int put_item(Buf *b, PyObject *seq, Py_ssize_t i, int (*put)(Buf *, PyObject *)) {
    PyObject *item = Py_NewRef(PySequence_Fast_GET_ITEM(seq, i));
    int failed = put(b, item);
    Py_DECREF(item);
    return failed;
}

/* Each item of the sequence attribute `attr` of `obj` (a repeated message field), written by `put`. */
static int put_each(Buf *b, PyObject *obj, int attr, int (*put)(Buf *, PyObject *)) {
    PyObject *items = PyObject_GetAttr(obj, names[attr]);
    if (items == NULL) return -1;
    PyObject *seq = PySequence_Fast(items, "a repeated field must be a sequence");
    Py_DECREF(items);
    if (seq == NULL) return -1;
    int failed = 0;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq) && !failed; i++)
        failed = put_item(b, seq, i, put);
    Py_DECREF(seq);
    return failed ? -1 : 0;
}

/* A (key, value) tuple as an entry of the map field `field`: key 1 and value 2, both always. */
static int put_entry(Buf *b, PyObject *pair, int field, int float_value) {
    if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
        PyErr_SetString(PyExc_TypeError, "a map entry must be a (key, value) tuple");
        return -1;
    }
    Py_ssize_t start = open_field(b, field);
    if (start < 0 || put_str(b, 1, PyTuple_GET_ITEM(pair, 0), 1)) return -1;
    if (float_value ? put_float(b, 2, PyTuple_GET_ITEM(pair, 1), 1) : put_str(b, 2, PyTuple_GET_ITEM(pair, 1), 1))
        return -1;
    return close_field(b, start);
}

static int put_timing(Buf *b, PyObject *pair) { return put_entry(b, pair, 8, 1); }  /* timings_ms */

static int put_version(Buf *b, PyObject *pair) { return put_entry(b, pair, 11, 0); }  /* model_versions */

static int put_box(Buf *b, PyObject *detection) {
    PyObject *box = PyObject_GetAttr(detection, names[BOX]);
    if (box == NULL) return -1;
    Py_ssize_t start = open_field(b, 4);
    int failed = start < 0;
    for (int i = 0; i < 4 && !failed; i++) {
        PyObject *coordinate = PyObject_GetAttr(box, box_names[i]);
        failed = coordinate == NULL || put_float(b, i + 1, coordinate, 0);
        Py_XDECREF(coordinate);
    }
    Py_DECREF(box);
    return failed || close_field(b, start) ? -1 : 0;
}

static int put_attribute(Buf *b, PyObject *attribute) {
    Py_ssize_t start = open_field(b, 5);
    if (start < 0) return -1;
    PUT_ATTR(put_str, b, attribute, MODEL, 1, 0);
    PUT_ATTR(put_str, b, attribute, LABEL, 2, 0);
    PUT_ATTR(put_float, b, attribute, SCORE, 3, 0);
    return close_field(b, start);
}

static int put_detection(Buf *b, PyObject *detection) {
    Py_ssize_t start = open_field(b, 7);
    if (start < 0) return -1;
    PUT_ATTR(put_uint32, b, detection, CLASS_ID, 1);
    PUT_ATTR(put_str, b, detection, LABEL, 2, 0);
    PUT_ATTR(put_float, b, detection, SCORE, 3, 0);
    if (put_box(b, detection) || put_each(b, detection, ATTRIBUTES, put_attribute)) return -1;
    return close_field(b, start);
}

static int put_status(Buf *b, PyObject *outcome) {
    Py_ssize_t start = open_field(b, 4);
    if (start < 0) return -1;
    PUT_ATTR(put_int32, b, outcome, CODE, 1, 0);
    PUT_ATTR(put_str, b, outcome, MESSAGE, 2, 0);
    return close_field(b, start);
}

static int put_result(Buf *b, PyObject *outcome) {
    PUT_ATTR(put_str, b, outcome, BATCH_ID, 1, 0);
    PUT_ATTR(put_uint32, b, outcome, INDEX, 2);
    PUT_ATTR(put_str, b, outcome, NAME, 3, 0);
    if (put_status(b, outcome)) return -1;
    PUT_ATTR(put_uint32, b, outcome, WIDTH, 5);
    PUT_ATTR(put_uint32, b, outcome, HEIGHT, 6);
    if (put_each(b, outcome, DETECTIONS, put_detection) || put_each(b, outcome, TIMINGS, put_timing)) return -1;
    PUT_ATTR(put_int32, b, outcome, WORKER, 9, 0);
    PyObject *cached = PyObject_GetAttr(outcome, names[CACHED]);
    if (cached == NULL) return -1;
    int truth = PyObject_IsTrue(cached);
    Py_DECREF(cached);
    if (truth < 0 || (truth && (put_tag(b, 10, VARINT) || put_varint(b, 1)))) return -1;
    return put_each(b, outcome, MODELS, put_version);
}

static PyObject *image_results(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "image_results(outcomes, field) takes two arguments");
        return NULL;
    }
    long field = PyLong_AsLong(args[1]);
    if (field == -1 && PyErr_Occurred()) return NULL;
    if (field < 1 || field > 536870911L) {
        PyErr_Format(PyExc_ValueError, "not a protobuf field number: %ld", field);
        return NULL;
    }
    PyObject *seq = PySequence_Fast(args[0], "outcomes must be a sequence");
    if (seq == NULL) return NULL;
    Buf b = {NULL, 0, 0};
    int failed = 0;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq) && !failed; i++) {
        Py_ssize_t start = open_field(&b, (int)field);
        failed = start < 0 || put_item(&b, seq, i, put_result) || close_field(&b, start);
    }
    Py_DECREF(seq);
    PyObject *out = failed ? NULL : PyBytes_FromStringAndSize(b.data ? b.data : "", b.len);
    PyMem_Free(b.data);
    return out;
}

static PyMethodDef methods[] = {
    {"image_results", (PyCFunction)(void (*)(void))image_results, METH_FASTCALL,
     "image_results(outcomes, field) -> bytes: each ImageOutcome as an ImageResult in field `field`."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_wire", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__wire(void) {
    static const char *const box_strings[4] = {"x1", "y1", "x2", "y2"};
    for (int i = 0; i < 18; i++)
        if ((names[i] = PyUnicode_InternFromString(name_strings[i])) == NULL) return NULL;
    for (int i = 0; i < 4; i++)
        if ((box_names[i] = PyUnicode_InternFromString(box_strings[i])) == NULL) return NULL;
    return PyModule_Create(&module);
}
