/* The Python module shell of fp8core's C kernel: it only makes the shared library
 * importable (so its path is found like any module's); fp8core/_kernel.py calls
 * the fp8q_* functions of fp8q.c through ctypes. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

int fp8q_abi_version(void);

static struct PyModuleDef fp8q_module = {
    PyModuleDef_HEAD_INIT, "_fp8q",
    "fp8core's fused CPU quantizer (C); used through fp8core._kernel.", -1, NULL,
};

PyMODINIT_FUNC PyInit__fp8q(void) {
    PyObject *m = PyModule_Create(&fp8q_module);
    if (m && PyModule_AddIntConstant(m, "ABI_VERSION", fp8q_abi_version()) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
