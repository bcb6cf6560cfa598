/* The sample index of megaponder.data.sample_index in one pass over the documents.
 *
 * fill_sample_idx(sizes, doc_idx, seq_length, out) -> the stream's token count; writes the rows
 * of build_sample_idx into
 * ``out`` ([num_samples + 1, 2], C-contiguous): row j is (i, j*S - start_i) for the last
 * document i of the shuffled stream starting at or before j*S (empty documents own no row;
 * rows past the end belong to the entry i = len(doc_idx), whose start is the stream's length).
 * The Python caller sets row 0 and megatron's drop_last=False final row afterwards, exactly as
 * the numpy path does, so both paths share that logic.
 *
 * Written against the CPython C API and the buffer protocol only, so the build needs no numpy
 * headers: sizes, doc_idx and out may each be int32 or int64 (every combination is its own
 * specialised loop, so the element width is not re-tested per element). The GIL is released
 * while the loop runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define DEFINE_FILL(NAME, SIZE_T, DOC_T, OUT_T)                                                  \
    static Py_ssize_t NAME(const SIZE_T *sizes, Py_ssize_t num_sizes, const DOC_T *doc_idx,      \
                           Py_ssize_t num_docs, int64_t seq_length, OUT_T *out,                  \
                           Py_ssize_t num_rows, int64_t *total)                                  \
    {                                                                                            \
        int64_t start = 0;    /* first stream position of document i */                         \
        int64_t position = 0; /* j * seq_length */                                              \
        Py_ssize_t j = 0;     /* next row to write */                                           \
        /* every document is visited (not only up to the last row) so that the bounds check    \
           and the total cover all of doc_idx, as in the numpy path */                          \
        for (Py_ssize_t i = 0; i < num_docs; i++) {                                              \
            int64_t doc = (int64_t)doc_idx[i];                                                   \
            if (doc < 0 || doc >= (int64_t)num_sizes)                                            \
                return i; /* the caller raises IndexError for doc_idx[i] */                      \
            int64_t end = start + (int64_t)sizes[doc];                                           \
            /* rows with position < start were written by earlier documents */                  \
            for (; j < num_rows && position < end; j++, position += seq_length) {                \
                out[2 * j] = (OUT_T)i;                                                           \
                out[2 * j + 1] = (OUT_T)(position - start);                                      \
            }                                                                                    \
            start = end;                                                                         \
        }                                                                                        \
        for (; j < num_rows; j++, position += seq_length) {                                      \
            out[2 * j] = (OUT_T)num_docs;                                                        \
            out[2 * j + 1] = (OUT_T)(position - start);                                          \
        }                                                                                        \
        *total = start;                                                                          \
        return -1;                                                                               \
    }

DEFINE_FILL(fill_s32_d32_o32, int32_t, int32_t, int32_t)
DEFINE_FILL(fill_s32_d32_o64, int32_t, int32_t, int64_t)
DEFINE_FILL(fill_s32_d64_o32, int32_t, int64_t, int32_t)
DEFINE_FILL(fill_s32_d64_o64, int32_t, int64_t, int64_t)
DEFINE_FILL(fill_s64_d32_o32, int64_t, int32_t, int32_t)
DEFINE_FILL(fill_s64_d32_o64, int64_t, int32_t, int64_t)
DEFINE_FILL(fill_s64_d64_o32, int64_t, int64_t, int32_t)
DEFINE_FILL(fill_s64_d64_o64, int64_t, int64_t, int64_t)

typedef Py_ssize_t (*fill_fn)(const void *, Py_ssize_t, const void *, Py_ssize_t, int64_t, void *,
                              Py_ssize_t, int64_t *);

/* Index [sizes wide][doc_idx wide][out wide]; the casts only drop the element types. */
static const fill_fn FILLS[2][2][2] = {
    {{(fill_fn)fill_s32_d32_o32, (fill_fn)fill_s32_d32_o64},
     {(fill_fn)fill_s32_d64_o32, (fill_fn)fill_s32_d64_o64}},
    {{(fill_fn)fill_s64_d32_o32, (fill_fn)fill_s64_d32_o64},
     {(fill_fn)fill_s64_d64_o32, (fill_fn)fill_s64_d64_o64}},
};

/* 1 for a native int64 buffer, 0 for int32, -1 (exception set) for anything else. */
static int integer_width(const Py_buffer *view, const char *name, int ndim)
{
    const char *format = view->format ? view->format : "B";
    if (*format == '@' || *format == '=' || (*format == '<' && PY_LITTLE_ENDIAN))
        format++;
    int is_signed_int = format[0] != '\0' && format[1] == '\0' && strchr("ilq", format[0]) != NULL;
    if (view->ndim != ndim || !is_signed_int || (view->itemsize != 4 && view->itemsize != 8)) {
        PyErr_Format(PyExc_TypeError,
                     "%s must be a %d-d C-contiguous int32 or int64 array (got format '%s', "
                     "%d-d, %zd-byte items)",
                     name, ndim, view->format ? view->format : "B", view->ndim, view->itemsize);
        return -1;
    }
    return view->itemsize == 8;
}

static PyObject *fill_sample_idx(PyObject *self, PyObject *args)
{
    PyObject *sizes_obj, *doc_idx_obj, *out_obj;
    long long seq_length;
    if (!PyArg_ParseTuple(args, "OOLO:fill_sample_idx", &sizes_obj, &doc_idx_obj, &seq_length,
                          &out_obj))
        return NULL;
    if (seq_length < 1) {
        PyErr_Format(PyExc_ValueError, "seq_length must be positive (got %lld)", seq_length);
        return NULL;
    }
    Py_buffer sizes, doc_idx, out;
    if (PyObject_GetBuffer(sizes_obj, &sizes, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return NULL;
    if (PyObject_GetBuffer(doc_idx_obj, &doc_idx, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyBuffer_Release(&sizes);
        return NULL;
    }
    if (PyObject_GetBuffer(out_obj, &out, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&doc_idx);
        PyBuffer_Release(&sizes);
        return NULL;
    }
    PyObject *result = NULL;
    int sizes_wide = integer_width(&sizes, "sizes", 1);
    int doc_wide = sizes_wide < 0 ? -1 : integer_width(&doc_idx, "doc_idx", 1);
    int out_wide = doc_wide < 0 ? -1 : integer_width(&out, "out", 2);
    if (out_wide < 0)
        goto done;
    if (out.shape[1] != 2) {
        PyErr_Format(PyExc_ValueError, "out must have 2 columns (got %zd)", out.shape[1]);
        goto done;
    }
    Py_ssize_t num_sizes = sizes.shape[0], num_docs = doc_idx.shape[0], num_rows = out.shape[0];
    /* positions reach (num_rows - 1) * seq_length; keep them inside int64 */
    if (num_rows > 1 && seq_length > INT64_MAX / (num_rows - 1)) {
        PyErr_Format(PyExc_OverflowError,
                     "%zd rows of seq_length %lld exceed int64 token positions", num_rows,
                     seq_length);
        goto done;
    }
    Py_ssize_t bad;
    int64_t total = 0;
    Py_BEGIN_ALLOW_THREADS
    bad = FILLS[sizes_wide][doc_wide][out_wide](sizes.buf, num_sizes, doc_idx.buf, num_docs,
                                                (int64_t)seq_length, out.buf, num_rows, &total);
    Py_END_ALLOW_THREADS
    if (bad >= 0) {
        long long value = doc_wide ? (long long)((const int64_t *)doc_idx.buf)[bad]
                                   : (long long)((const int32_t *)doc_idx.buf)[bad];
        PyErr_Format(PyExc_IndexError,
                     "doc_idx[%zd] = %lld is not a document of sizes (valid: 0..%zd)", bad, value,
                     num_sizes - 1);
        goto done;
    }
    result = PyLong_FromLongLong((long long)total);
done:
    PyBuffer_Release(&out);
    PyBuffer_Release(&doc_idx);
    PyBuffer_Release(&sizes);
    return result;
}

static PyMethodDef methods[] = {
    {"fill_sample_idx", fill_sample_idx, METH_VARARGS,
     "fill_sample_idx(sizes, doc_idx, seq_length, out) -> total tokens; writes the sample-index "
     "rows into out."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_sample_index",
    "Compiled one-pass sample index (megaponder.data.sample_index).", -1, methods,
};

PyMODINIT_FUNC PyInit__sample_index(void) { return PyModule_Create(&module); }
