// A CPython entry for the per-call kernels (`lowbit.kernels.fastcall`): lb_linear / lb_conv called with the
// arguments the ctypes binding takes, at a tenth of its cost (ctypes converts its six arguments through generic
// machinery: ~0.6 us per call, as long as a small layer's kernel). The functions are bound by address at load
// (bind), so this module does not link the kernel library. The GIL is released during the call, as ctypes does.
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef int (*linear_fn)(const void*, const float*, int64_t, float*, int, const float*);
typedef int (*conv_fn)(const void*, const float*, const int64_t*, float*, int, const float*);
static linear_fn g_linear = nullptr;
static conv_fn g_conv = nullptr;

// One argument converted (a pointer: an int or None; an integer); false with the exception set on failure.
static bool take(void** out, PyObject* o) {
    *out = o == Py_None ? nullptr : PyLong_AsVoidPtr(o);
    return !PyErr_Occurred();
}
static bool take(long long* out, PyObject* o) {
    *out = PyLong_AsLongLong(o);
    return !(*out == -1 && PyErr_Occurred());
}
static bool take(long* out, PyObject* o) {
    *out = PyLong_AsLong(o);
    return !(*out == -1 && PyErr_Occurred());
}

static bool six(const char* name, Py_ssize_t n, void* fn) {
    if (n != 6) {
        PyErr_Format(PyExc_TypeError, "%s takes 6 arguments (%zd given)", name, n);
        return false;
    }
    if (!fn) {
        PyErr_Format(PyExc_RuntimeError, "%s: not bound to the kernel library", name);
        return false;
    }
    return true;
}

// linear(layer, x, rows, y, threads, bias or None) -> lb_linear's return code
static PyObject* linear(PyObject*, PyObject* const* a, Py_ssize_t n) {
    if (!six("linear", n, (void*)g_linear)) return nullptr;
    void *L, *x, *y, *b;
    long long rows;
    long threads;
    // each conversion checked before the next (none may run with an exception pending)
    if (!take(&L, a[0]) || !take(&x, a[1]) || !take(&rows, a[2]) || !take(&y, a[3]) || !take(&threads, a[4]) ||
        !take(&b, a[5]))
        return nullptr;
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = g_linear(L, (const float*)x, rows, (float*)y, (int)threads, (const float*)b);
    Py_END_ALLOW_THREADS return PyLong_FromLong(rc);
}

// conv(layer, x, geometry, y, threads, bias or None) -> lb_conv's return code
static PyObject* conv(PyObject*, PyObject* const* a, Py_ssize_t n) {
    if (!six("conv", n, (void*)g_conv)) return nullptr;
    void *L, *x, *g, *y, *b;
    long threads;
    if (!take(&L, a[0]) || !take(&x, a[1]) || !take(&g, a[2]) || !take(&y, a[3]) || !take(&threads, a[4]) ||
        !take(&b, a[5]))
        return nullptr;
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = g_conv(L, (const float*)x, (const int64_t*)g, (float*)y, (int)threads, (const float*)b);
    Py_END_ALLOW_THREADS return PyLong_FromLong(rc);
}

// bind(address of lb_linear, address of lb_conv)
static PyObject* bind(PyObject*, PyObject* const* a, Py_ssize_t n) {
    if (n != 2) {
        PyErr_SetString(PyExc_TypeError, "bind takes 2 arguments");
        return nullptr;
    }
    void *l = PyLong_AsVoidPtr(a[0]), *c = PyLong_AsVoidPtr(a[1]);
    if (PyErr_Occurred()) return nullptr;
    g_linear = (linear_fn)l;
    g_conv = (conv_fn)c;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"linear", (PyCFunction)(void (*)(void))linear, METH_FASTCALL, "lb_linear(layer, x, rows, y, threads, bias)"},
    {"conv", (PyCFunction)(void (*)(void))conv, METH_FASTCALL, "lb_conv(layer, x, geometry, y, threads, bias)"},
    {"bind", (PyCFunction)(void (*)(void))bind, METH_FASTCALL, "bind(lb_linear address, lb_conv address)"},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef module = {PyModuleDef_HEAD_INIT, "lowbit_fastcall", nullptr, -1, methods};

PyMODINIT_FUNC PyInit_lowbit_fastcall(void) { return PyModule_Create(&module); }
