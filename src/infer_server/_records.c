/* Frozen records made and remade in C: the data path's records (infer_server.messages) filled
 * field by field through object.__setattr__'s own C function, never through a __dict__.
 *
 * fill(obj, names, values) -> None: obj.<names[k]> = values[k] for every k, as
 *     object.__setattr__ would (a frozen dataclass's own __setattr__ is not called).
 * build(cls, names[, position, lookup], rows) -> list: for each row, a new instance of cls
 *     (object.__new__, no __init__) filled from the row, a tuple of every field's value in the
 *     order of `names`; with `position`, each row is a pair (key, the other fields' values) and the
 *     field at `position` is lookup[key] (an int code sent for its enum member). A row of the
 *     wrong shape raises ValueError, an unknown key KeyError.
 *
 * Why C, and why not __dict__: an instance whose attributes were set this way keeps them in the
 * values array CPython 3.11+ lays out with the object (its class's shared keys), and never
 * allocates a dict: making one costs about what writing a __dict__ did, remaking a pipe message's
 * records about half, and every later read of a field about half (docs/performance.md). Writing
 * `__dict__` turned every record into an object plus a 16-slot dict.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static int fill_from(PyObject *obj, PyObject *names, PyObject *values) {
    Py_ssize_t n = PyTuple_GET_SIZE(names);
    if (!PyTuple_Check(values) || PyTuple_GET_SIZE(values) != n) {
        PyErr_Format(PyExc_ValueError, "%s takes a row of %zd values", Py_TYPE(obj)->tp_name, n);
        return -1;
    }
    for (Py_ssize_t k = 0; k < n; k++)
        if (PyObject_GenericSetAttr(obj, PyTuple_GET_ITEM(names, k), PyTuple_GET_ITEM(values, k)) < 0) return -1;
    return 0;
}

static int check_names(PyObject *names) {
    if (!PyTuple_Check(names)) {
        PyErr_SetString(PyExc_TypeError, "names must be a tuple of str");
        return -1;
    }
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(names); k++)
        if (!PyUnicode_Check(PyTuple_GET_ITEM(names, k))) {
            PyErr_SetString(PyExc_TypeError, "names must be a tuple of str");
            return -1;
        }
    return 0;
}

static PyObject *fill(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "fill(obj, names, values) takes three arguments");
        return NULL;
    }
    if (check_names(args[1]) || fill_from(args[0], args[1], args[2])) return NULL;
    Py_RETURN_NONE;
}

/* One instance of `cls` from `row`: every field in order or, with `position` >= 0, a pair
 * (key, the other fields in order) whose field at `position` is lookup[key]. */
static PyObject *one(PyTypeObject *cls, PyObject *names, PyObject *row, Py_ssize_t position, PyObject *lookup,
                     PyObject *no_args) {
    Py_ssize_t n = PyTuple_GET_SIZE(names);
    PyObject *values = row, *key = NULL;
    if (position >= 0) {
        if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) != 2) {
            PyErr_Format(PyExc_ValueError, "%s takes rows of (key, values)", cls->tp_name);
            return NULL;
        }
        key = PyTuple_GET_ITEM(row, 0);
        values = PyTuple_GET_ITEM(row, 1);
    }
    if (!PyTuple_Check(values) || PyTuple_GET_SIZE(values) != n - (position >= 0)) {
        PyErr_Format(PyExc_ValueError, "%s takes a row of %zd values", cls->tp_name, n - (position >= 0));
        return NULL;
    }
    PyObject *looked_up = key == NULL ? NULL : PyObject_GetItem(lookup, key);
    if (key != NULL && looked_up == NULL) return NULL;
    PyObject *obj = PyBaseObject_Type.tp_new(cls, no_args, NULL);
    for (Py_ssize_t k = 0, j = 0; obj != NULL && k < n; k++) {
        PyObject *value = k == position ? looked_up : PyTuple_GET_ITEM(values, j++);
        if (PyObject_GenericSetAttr(obj, PyTuple_GET_ITEM(names, k), value) < 0) Py_CLEAR(obj);
    }
    Py_XDECREF(looked_up);
    return obj;
}

static PyObject *build(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 3 && nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "build(cls, names[, position, lookup], rows) takes three or five arguments");
        return NULL;
    }
    if (!PyType_Check(args[0]) || !PyType_IsSubtype((PyTypeObject *)args[0], &PyBaseObject_Type)) {
        PyErr_SetString(PyExc_TypeError, "cls must be a class");
        return NULL;
    }
    PyTypeObject *cls = (PyTypeObject *)args[0];
    if (cls->tp_new != PyBaseObject_Type.tp_new) {  /* what object.__new__(cls) would refuse, or a __new__ skipped */
        PyErr_Format(PyExc_TypeError, "%s has a __new__ of its own", cls->tp_name);
        return NULL;
    }
    if (check_names(args[1])) return NULL;
    Py_ssize_t position = -1;
    PyObject *lookup = NULL;
    if (nargs == 5) {
        position = PyLong_AsSsize_t(args[2]);
        if (position == -1 && PyErr_Occurred()) return NULL;
        lookup = args[3];
        if (position < 0 || position >= PyTuple_GET_SIZE(args[1])) {
            PyErr_SetString(PyExc_ValueError, "position must name one of the fields");
            return NULL;
        }
    }
    PyObject *seq = PySequence_Fast(args[nargs - 1], "rows must be a sequence");
    if (seq == NULL) return NULL;
    PyObject *no_args = PyTuple_New(0);
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject *out = no_args == NULL ? NULL : PyList_New(n);
    for (Py_ssize_t i = 0; out != NULL && i < n; i++) {
        PyObject *obj = one(cls, args[1], PySequence_Fast_GET_ITEM(seq, i), position, lookup, no_args);
        if (obj == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, i, obj);
    }
    Py_XDECREF(no_args);
    Py_DECREF(seq);
    return out;
}

static PyMethodDef methods[] = {
    {"fill", (PyCFunction)(void (*)(void))fill, METH_FASTCALL,
     "fill(obj, names, values) -> None: each field set as object.__setattr__ would."},
    {"build", (PyCFunction)(void (*)(void))build, METH_FASTCALL,
     "build(cls, names[, position, lookup], rows) -> list: an instance of cls per row, without __init__."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_records", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__records(void) { return PyModule_Create(&module); }
