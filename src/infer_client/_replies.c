/* A reply's results read straight from its bytes into the client's result records.
 *
 * configure(ImageResult, Detection, Box, Attribute, codes, unknown): the record classes
 * (infer_client.results) and the numeric code -> grpc.StatusCode table with its default; once,
 * before the first call of
 *
 * image_results(payload, field) -> list[ImageResult]: every length-delimited field `field` of the
 * serialized message `payload` (SessionReply.results: field 2) read as an ImageResult
 * (proto/infer.proto) into the record ImageResult.from_proto makes of protobuf's parse of the
 * same bytes (tests/unit/test_replies.py holds the two together): fields left out take proto3's
 * defaults, a scalar given twice its last value, a message given twice (status, box) the merge
 * of both, a map key its last entry's value; fields this message does not have are skipped.
 * What it does not read as protobuf would, it refuses with ValueError rather than guess: a field
 * of a known number but another wire type, an integer beyond its type's range, a group, bytes
 * that end inside a field, a string that is not UTF-8. The caller then takes protobuf's way.
 *
 * Why C: a result made from protobuf's message costs a Python attribute read per field (each
 * made into an object) and a record built in Python; it was the client's largest cost per image
 * after writing the batch file (docs/performance.md).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { VARINT = 0, FIXED64 = 1, DELIMITED = 2, FIXED32 = 5 };

typedef struct {
    const uint8_t *p, *end;
} Reader;

static int fail(const char *why) {
    PyErr_SetString(PyExc_ValueError, why);
    return -1;
}

static int read_varint(Reader *r, uint64_t *out) {
    uint64_t v = 0;
    for (int shift = 0; shift < 70; shift += 7) {
        if (r->p >= r->end) return fail("the bytes end inside a varint");
        uint8_t byte = *r->p++;
        v |= (uint64_t)(byte & 0x7f) << (shift < 64 ? shift : 63);
        if (!(byte & 0x80)) {
            *out = v;
            return 0;
        }
    }
    return fail("a varint longer than ten bytes");
}

/* The next field's number and wire type. */
static int read_tag(Reader *r, uint32_t *field, int *wire) {
    uint64_t key;
    if (read_varint(r, &key)) return -1;
    if (key >> 32 || (key >> 3) == 0) return fail("not a field key");
    *field = (uint32_t)(key >> 3);
    *wire = (int)(key & 7);
    return 0;
}

/* A length-delimited field's content, as a reader of its own. */
static int read_delimited(Reader *r, Reader *inner) {
    uint64_t n;
    if (read_varint(r, &n)) return -1;
    if (n > (uint64_t)(r->end - r->p)) return fail("a field longer than the bytes left");
    inner->p = r->p;
    inner->end = r->p + n;
    r->p += n;
    return 0;
}

static int skip(Reader *r, int wire) {
    uint64_t v;
    Reader inner;
    switch (wire) {
    case VARINT:
        return read_varint(r, &v);
    case DELIMITED:
        return read_delimited(r, &inner);
    case FIXED64:
    case FIXED32: {
        Py_ssize_t n = wire == FIXED64 ? 8 : 4;
        if (r->end - r->p < n) return fail("the bytes end inside a fixed-size field");
        r->p += n;
        return 0;
    }
    default:
        return fail("a group or an unknown wire type");
    }
}

/* A known field's wire type `wire`: the one its type has (`expected`), or a refusal. */
static int expect(int wire, int expected) { return wire == expected ? 0 : fail("a field of an unexpected wire type"); }

static int read_uint32(Reader *r, int wire, uint32_t *out) {
    uint64_t v;
    if (expect(wire, VARINT) || read_varint(r, &v)) return -1;
    if (v > UINT32_MAX) return fail("a uint32 field out of range");
    *out = (uint32_t)v;
    return 0;
}

static int read_int32(Reader *r, int wire, int32_t *out) {
    uint64_t v;
    if (expect(wire, VARINT) || read_varint(r, &v)) return -1;
    int64_t s = (int64_t)v;
    if (s < INT32_MIN || s > INT32_MAX) return fail("an int32 field out of range");
    *out = (int32_t)s;
    return 0;
}

static int read_float(Reader *r, int wire, double *out) {
    if (expect(wire, FIXED32)) return -1;
    if (r->end - r->p < 4) return fail("the bytes end inside a float");
    uint32_t bits = (uint32_t)r->p[0] | (uint32_t)r->p[1] << 8 | (uint32_t)r->p[2] << 16 | (uint32_t)r->p[3] << 24;
    r->p += 4;
    float f;
    memcpy(&f, &bits, sizeof f);
    *out = (double)f;
    return 0;
}

/* A string field into `*slot` (replacing what it held). */
static int read_str(Reader *r, int wire, PyObject **slot) {
    Reader s;
    if (expect(wire, DELIMITED) || read_delimited(r, &s)) return -1;
    PyObject *text = PyUnicode_DecodeUTF8((const char *)s.p, s.end - s.p, NULL);
    if (text == NULL) return -1;  /* UnicodeDecodeError: a ValueError */
    Py_XSETREF(*slot, text);
    return 0;
}

static PyObject *image_result_cls, *detection_cls, *box_cls, *attribute_cls, *codes, *unknown_code;
static PyObject *empty_tuple, *empty_text, *empty_map;  /* empty_map: a read-only view of an empty dict */
enum {
    BATCH_ID, INDEX, NAME, CODE, MESSAGE, WIDTH, HEIGHT, DETECTIONS, TIMINGS, WORKER, CACHED, VERSIONS,
    CLASS_ID, LABEL, SCORE, BOX, ATTRIBUTES, MODEL, X1, Y1, X2, Y2, NAMES,
};
static const char *const name_strings[NAMES] = {
    "batch_id", "index", "name", "code", "message", "width", "height", "detections", "timings_ms", "worker",
    "cached", "model_versions", "class_id", "label", "score", "box", "attributes", "model", "x1", "y1", "x2", "y2",
};
static PyObject *names[NAMES];

/* An instance of `cls` with `fields` as its __dict__, made without __init__ (results._built). */
static PyObject *record(PyObject *cls, PyObject *fields) {
    if (fields == NULL) return NULL;
    PyObject *obj = PyBaseObject_Type.tp_new((PyTypeObject *)cls, empty_tuple, NULL);
    if (obj != NULL && PyObject_GenericSetDict(obj, fields, NULL) < 0) Py_CLEAR(obj);
    Py_DECREF(fields);
    return obj;
}

/* Sets `name` of `dict` to `value`, a new reference it takes (NULL: a failure already raised). */
static int put(PyObject *dict, int name, PyObject *value) {
    if (value == NULL) return -1;
    int failed = PyDict_SetItem(dict, names[name], value);
    Py_DECREF(value);
    return failed;
}

/* An Attribute message into `attributes`, under its model name (the last one of a name wins). */
static int read_attribute(Reader *r, PyObject *attributes) {
    PyObject *model = Py_NewRef(empty_text), *label = Py_NewRef(empty_text);
    double score = 0;
    uint32_t field;
    int wire, failed = 0;
    while (!failed && r->p < r->end) {
        failed = read_tag(r, &field, &wire) || (field == 1   ? read_str(r, wire, &model)
                                                : field == 2 ? read_str(r, wire, &label)
                                                : field == 3 ? read_float(r, wire, &score)
                                                             : skip(r, wire));
    }
    PyObject *fields = failed ? NULL : PyDict_New();
    if (fields != NULL &&
        (PyDict_SetItem(fields, names[MODEL], model) || PyDict_SetItem(fields, names[LABEL], label) ||
         put(fields, SCORE, PyFloat_FromDouble(score))))
        Py_CLEAR(fields);
    PyObject *attribute = record(attribute_cls, fields);
    failed = attribute == NULL || PyDict_SetItem(attributes, model, attribute);
    Py_XDECREF(attribute);
    Py_DECREF(model);
    Py_DECREF(label);
    return failed ? -1 : 0;
}

/* A box given more than once is the merge of them all: read into one set of corners. */
static PyObject *read_detection(Reader *r) {
    uint32_t class_id = 0, field;
    double score = 0, corners[4] = {0, 0, 0, 0};
    PyObject *label = Py_NewRef(empty_text), *attributes = PyDict_New();
    int wire, failed = attributes == NULL;
    Reader inner;
    while (!failed && r->p < r->end) {
        if (read_tag(r, &field, &wire)) {
            failed = 1;
            break;
        }
        switch (field) {
        case 1: failed = read_uint32(r, wire, &class_id); break;
        case 2: failed = read_str(r, wire, &label); break;
        case 3: failed = read_float(r, wire, &score); break;
        case 4:
            failed = expect(wire, DELIMITED) || read_delimited(r, &inner);
            while (!failed && inner.p < inner.end) {
                uint32_t f;
                int w;
                failed = read_tag(&inner, &f, &w) || (f >= 1 && f <= 4 ? read_float(&inner, w, &corners[f - 1])
                                                                          : skip(&inner, w));
            }
            break;
        case 5: failed = expect(wire, DELIMITED) || read_delimited(r, &inner) || read_attribute(&inner, attributes); break;
        default: failed = skip(r, wire);
        }
    }
    PyObject *fields = failed ? NULL : PyDict_New(), *box = NULL;
    if (fields != NULL) {
        box = PyDict_New();
        for (int i = 0; box != NULL && i < 4; i++)
            if (put(box, X1 + i, PyFloat_FromDouble(corners[i]))) Py_CLEAR(box);
        if (put(fields, CLASS_ID, PyLong_FromUnsignedLong(class_id)) || PyDict_SetItem(fields, names[LABEL], label) ||
            put(fields, SCORE, PyFloat_FromDouble(score)) || put(fields, BOX, record(box_cls, box)) ||
            put(fields, ATTRIBUTES, PyDictProxy_New(attributes)))
            Py_CLEAR(fields);
    }
    Py_DECREF(label);
    Py_XDECREF(attributes);
    return record(detection_cls, fields);
}

/* A map<string, float> (`floats`) or map<string, string> entry into `map`. An entry with a field
 * of another number or wire type is refused: protobuf keeps such an entry out of the map (among
 * the message's unknown fields). */
static int read_entry(Reader *r, int wire, PyObject *map, int floats) {
    Reader entry;
    if (expect(wire, DELIMITED) || read_delimited(r, &entry)) return -1;
    PyObject *key = Py_NewRef(empty_text), *text = Py_NewRef(empty_text);
    double number = 0;
    uint32_t field;
    int w, failed = 0;
    while (!failed && entry.p < entry.end) {
        failed = read_tag(&entry, &field, &w) || (field == 1             ? read_str(&entry, w, &key)
                                                  : field == 2 && floats ? read_float(&entry, w, &number)
                                                  : field == 2           ? read_str(&entry, w, &text)
                                                                         : fail("an unknown field in a map entry"));
    }
    if (!failed) {
        PyObject *value = floats ? PyFloat_FromDouble(number) : Py_NewRef(text);
        failed = value == NULL || PyDict_SetItem(map, key, value);
        Py_XDECREF(value);
    }
    Py_DECREF(key);
    Py_DECREF(text);
    return failed ? -1 : 0;
}

/* The last batch id read, and its bytes in the payload: the results of a reply mostly share one,
 * which then is one string. */
typedef struct {
    PyObject *text;
    const uint8_t *p;
    Py_ssize_t n;
} Last;

typedef struct {
    Last *last;
    PyObject *batch_id, *name, *message, *detections, *timings, *versions;
    uint32_t index, width, height;
    int32_t code, worker;
    int cached;
} Result;

static int read_status(Reader *r, int wire, Result *out) {
    Reader status;
    uint32_t field;
    int w;
    if (expect(wire, DELIMITED) || read_delimited(r, &status)) return -1;
    while (status.p < status.end) {
        if (read_tag(&status, &field, &w)) return -1;
        if (field == 1 ? read_int32(&status, w, &out->code)
            : field == 2 ? read_str(&status, w, &out->message)
                         : skip(&status, w))
            return -1;
    }
    return 0;
}

static int read_batch_id(Reader *r, int wire, Result *out) {
    Reader s;
    if (expect(wire, DELIMITED) || read_delimited(r, &s)) return -1;
    Last *last = out->last;
    Py_ssize_t n = s.end - s.p;
    if (last->text == NULL || n != last->n || memcmp(s.p, last->p, (size_t)n) != 0) {
        PyObject *text = PyUnicode_DecodeUTF8((const char *)s.p, n, NULL);
        if (text == NULL) return -1;
        Py_XSETREF(last->text, text);
        last->p = s.p;
        last->n = n;
    }
    Py_XSETREF(out->batch_id, Py_NewRef(last->text));
    return 0;
}

static int read_field(Reader *r, uint32_t field, int wire, Result *out) {
    uint64_t v;
    Reader inner;
    PyObject *detection;
    switch (field) {
    case 1: return read_batch_id(r, wire, out);
    case 2: return read_uint32(r, wire, &out->index);
    case 3: return read_str(r, wire, &out->name);
    case 4: return read_status(r, wire, out);
    case 5: return read_uint32(r, wire, &out->width);
    case 6: return read_uint32(r, wire, &out->height);
    case 7: {
        if (expect(wire, DELIMITED) || read_delimited(r, &inner) || (detection = read_detection(&inner)) == NULL)
            return -1;
        if (out->detections == NULL && (out->detections = PyList_New(0)) == NULL) {
            Py_DECREF(detection);
            return -1;
        }
        int failed = PyList_Append(out->detections, detection);
        Py_DECREF(detection);
        return failed;
    }
    case 8:
        if (out->timings == NULL && (out->timings = PyDict_New()) == NULL) return -1;
        return read_entry(r, wire, out->timings, 1);
    case 9: return read_int32(r, wire, &out->worker);
    case 10:
        if (expect(wire, VARINT) || read_varint(r, &v)) return -1;
        out->cached = v != 0;
        return 0;
    case 11:
        if (out->versions == NULL && (out->versions = PyDict_New()) == NULL) return -1;
        return read_entry(r, wire, out->versions, 0);
    default: return skip(r, wire);
    }
}

static PyObject *read_result(Reader *r, Last *last) {
    Result out = {last, Py_NewRef(empty_text), Py_NewRef(empty_text), Py_NewRef(empty_text), NULL, NULL, NULL,
                  0, 0, 0, 0, 0, 0};
    int failed = 0;
    uint32_t field;
    int wire;
    while (!failed && r->p < r->end)
        failed = read_tag(r, &field, &wire) || read_field(r, field, wire, &out);
    PyObject *fields = failed ? NULL : PyDict_New();
    if (fields != NULL) {
        PyObject *code = PyLong_FromLong(out.code), *status = NULL;
        if (code != NULL) {
            status = PyDict_GetItemWithError(codes, code);  /* borrowed */
            status = status != NULL ? status : PyErr_Occurred() ? NULL : unknown_code;
            Py_DECREF(code);
        }
        if (PyDict_SetItem(fields, names[BATCH_ID], out.batch_id) ||
            put(fields, INDEX, PyLong_FromUnsignedLong(out.index)) || PyDict_SetItem(fields, names[NAME], out.name) ||
            status == NULL || PyDict_SetItem(fields, names[CODE], status) ||
            PyDict_SetItem(fields, names[MESSAGE], out.message) ||
            put(fields, WIDTH, PyLong_FromUnsignedLong(out.width)) ||
            put(fields, HEIGHT, PyLong_FromUnsignedLong(out.height)) ||
            put(fields, DETECTIONS, out.detections ? PyList_AsTuple(out.detections) : Py_NewRef(empty_tuple)) ||
            put(fields, TIMINGS, out.timings ? PyDictProxy_New(out.timings) : Py_NewRef(empty_map)) || put(fields, WORKER, PyLong_FromLong(out.worker)) ||
            PyDict_SetItem(fields, names[CACHED], out.cached ? Py_True : Py_False) ||
            put(fields, VERSIONS, out.versions ? PyDictProxy_New(out.versions) : Py_NewRef(empty_map)))
            Py_CLEAR(fields);
    }
    Py_DECREF(out.batch_id);
    Py_DECREF(out.name);
    Py_DECREF(out.message);
    Py_XDECREF(out.detections);
    Py_XDECREF(out.timings);
    Py_XDECREF(out.versions);
    return record(image_result_cls, fields);
}

static PyObject *image_results(PyObject *module, PyObject *args) {
    (void)module;
    Py_buffer view;
    long wanted;
    if (!PyArg_ParseTuple(args, "y*l:image_results", &view, &wanted)) return NULL;
    if (image_result_cls == NULL || wanted < 1 || wanted > 536870911L) {
        PyBuffer_Release(&view);
        fail(image_result_cls == NULL ? "configure() was not called" : "not a protobuf field number");
        return NULL;
    }
    Reader r = {view.buf, (const uint8_t *)view.buf + view.len};
    PyObject *out = PyList_New(0);
    Last last = {NULL, NULL, 0};
    uint32_t field;
    int wire;
    while (out != NULL && r.p < r.end) {
        Reader inner;
        PyObject *result = NULL;
        if (read_tag(&r, &field, &wire) ||
            (field == (uint32_t)wanted ? expect(wire, DELIMITED) || read_delimited(&r, &inner) ||
                                             (result = read_result(&inner, &last)) == NULL
                                       : skip(&r, wire)) ||
            (result != NULL && PyList_Append(out, result))) {
            Py_CLEAR(out);
        }
        Py_XDECREF(result);
    }
    Py_XDECREF(last.text);
    PyBuffer_Release(&view);
    return out;
}

static PyObject *configure(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *classes[4], *table, *fallback;
    if (!PyArg_ParseTuple(args, "O!O!O!O!O!O:configure", &PyType_Type, &classes[0], &PyType_Type, &classes[1],
                          &PyType_Type, &classes[2], &PyType_Type, &classes[3], &PyDict_Type, &table, &fallback))
        return NULL;
    Py_XSETREF(image_result_cls, Py_NewRef(classes[0]));
    Py_XSETREF(detection_cls, Py_NewRef(classes[1]));
    Py_XSETREF(box_cls, Py_NewRef(classes[2]));
    Py_XSETREF(attribute_cls, Py_NewRef(classes[3]));
    Py_XSETREF(codes, Py_NewRef(table));
    Py_XSETREF(unknown_code, Py_NewRef(fallback));
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS,
     "configure(ImageResult, Detection, Box, Attribute, codes, unknown): the records to make and the codes."},
    {"image_results", image_results, METH_VARARGS,
     "image_results(payload, field) -> list: each ImageResult in field `field` of `payload`, as a record."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_replies", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__replies(void) {
    for (int i = 0; i < NAMES; i++)
        if ((names[i] = PyUnicode_InternFromString(name_strings[i])) == NULL) return NULL;
    PyObject *empty = PyDict_New();
    if (empty == NULL) return NULL;
    empty_map = PyDictProxy_New(empty);
    Py_DECREF(empty);
    if (empty_map == NULL || (empty_tuple = PyTuple_New(0)) == NULL || (empty_text = PyUnicode_FromString("")) == NULL)
        return NULL;
    return PyModule_Create(&module);
}
