/* displback.backend._copythreads: copy-mode frame copies on native threads.
 *
 * Theory of operation
 * -------------------
 * One CopyThreads object owns a `struct pool` (mutex, one condition for the queue, one for
 * threads that end, one for jobs that finish, two intrusive FIFO lists of jobs, counters, an
 * eventfd) and up to max_threads detached worker threads. The event loop (Python, GIL held)
 * validates a copy, takes the Py_buffer exports and links a `struct job` into the queue; a
 * worker takes it, copies with the mutex dropped, links it into the finished list and writes
 * 1 to the eventfd (outside the mutex). The loop sees the eventfd readable, calls finished():
 * the jobs are unlinked, their exports released (GIL held) and (id, errno) returned in finish
 * order.
 *
 * Flips: a job may carry a KMS page flip, ioctl(fd, request, arg), that its thread issues
 * right after the copy (as displ_be does), so the flip does not wait for an event-loop pass.
 * While `quiet` is set, a job whose flip succeeded is linked into the finished list without
 * writing the eventfd: the loop learns of the flip from its DRM event and reaps the job then
 * (finished(wait_for=id) waits for it if it is still copying). Setting quiet false writes the
 * eventfd when such jobs wait, so that none is left unreaped.
 *
 * Worker threads never touch a Python object nor the GIL, never allocate, and block every
 * signal (Python's handlers run on the main thread). Jobs are allocated and freed with the
 * GIL held only. The pool outlives the object while a thread still runs: it is reference
 * counted (the object and every live thread), and whoever drops the last reference frees it,
 * so a thread that has just said it ended may still unlock the mutex after close() returned.
 *
 * Lifetime of the memory copied: a job holds its exports (source, destination, flip arg)
 * from submit() until finished() or close() reaps it, so an mmap or memoryview cannot be
 * closed or released under a thread (BufferError). close() (and dealloc, and tp_clear) lets
 * the threads copy every queued job, waits with the GIL released until no thread is alive,
 * then releases what is left.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

PyDoc_STRVAR(module_doc,
"Copy-mode frame copies on native threads that never take the GIL.\n"
"\n"
"In a nested Xen Dom0 a system call costs ~100x native, and a copy handed to a Python\n"
"worker thread costs the event loop ~20 futex calls (GIL hand-offs, queue) and ~12 clock\n"
"reads, ~0.7-1 ms per flip more than a plain memcpy. CopyThreads copies on its own threads\n"
"and hands completions back through one eventfd the event loop waits on.");

#define MAX_THREADS_LIMIT 256
/* A flip ioctl is tried this many times in all while it fails with EINTR or EAGAIN. */
#define FLIP_TRIES 100

/* One copy: row r from src + r*src_pitch to dst + r*dst_pitch, width bytes each; then, with
 * a flip, ioctl(flip_fd, flip_request, flip_arg) on the same thread. */
struct job {
    struct job *next;           /* in the queue or the finished list: under pool->lock */
    struct job *all_prev;       /* every job not yet reaped: GIL only */
    struct job *all_next;
    uint64_t id;
    int error;                  /* errno of the job, 0 if it went well: set before it is done */
    bool done;                  /* in the finished list, or was: under pool->lock */
    const unsigned char *src;
    unsigned char *dst;
    size_t src_pitch, dst_pitch, width, height;
    bool flip;
    int flip_fd;
    unsigned long flip_request;
    void *flip_arg;
    Py_buffer src_view;         /* held until reaped (GIL) */
    Py_buffer dst_view;
    Py_buffer flip_view;        /* with a flip only */
};

/* What the object and its threads share. Everything below `lock` is under it, but for
 * efd (set before any thread starts, closed after every thread ended) and the idle time. */
struct pool {
    pthread_mutex_t lock;
    pthread_cond_t work;        /* a job was queued, or the pool closes */
    pthread_cond_t ended;       /* a thread ended */
    pthread_cond_t finish;      /* a job finished, and waiters > 0 */
    struct job *queue_head, *queue_tail;
    struct job *done_head, *done_tail;
    size_t queued;              /* jobs in the queue */
    unsigned running;           /* jobs taken by a thread and not yet finished */
    unsigned live;              /* threads alive, or being started */
    unsigned idle;              /* threads waiting for a job */
    unsigned refs;              /* the object, and every live thread */
    unsigned waiters;           /* finished(wait_for=...) calls waiting on finish */
    bool closing;               /* threads end once the queue is empty */
    bool quiet;                 /* a job whose flip went well does not write the eventfd */
    bool signalled;             /* the eventfd was (or is about to be) written since the
                                 * last finished() that cleared this flag and then read it */
    bool idle_forever;
    struct timespec idle_time;
    int efd;
};

enum { OPEN, CLOSING, CLOSED };

typedef struct {
    PyObject_HEAD
    struct pool *pool;
    struct job *jobs;           /* every job not yet reaped (all_next list): GIL only */
    unsigned max_threads;
    bool quiet;                 /* as pool->quiet, readable without the mutex (GIL) */
    int state;
    unsigned long fork_generation;
} CopyThreadsObject;

/* Bumped in every child process after fork (pthread_atfork): an object made before the
 * fork has no threads there, and its mutex may have been held by one in the parent. */
static volatile unsigned long fork_generation;

static void
after_fork_in_child(void)
{
    fork_generation++;
}

/* ---- the worker side: no Python, no GIL, no allocation ---- */

static void
copy_rows(const struct job *j)
{
    if (j->width == 0 || j->height == 0)
        return;
    if (j->src_pitch == j->dst_pitch) {
        /* One span, including the bytes between rows (as pixels.copy_frame). */
        memcpy(j->dst, j->src, j->src_pitch * (j->height - 1) + j->width);
        return;
    }
    for (size_t r = 0; r < j->height; r++)
        memcpy(j->dst + r * j->dst_pitch, j->src + r * j->src_pitch, j->width);
}

/* The job's flip ioctl: 0, or the errno of its last try. */
static int
flip(const struct job *j)
{
    int err = 0;
    for (int tries = 0; tries < FLIP_TRIES; tries++) {
        if (ioctl(j->flip_fd, j->flip_request, j->flip_arg) != -1)
            return 0;
        err = errno;
        if (err != EINTR && err != EAGAIN)
            break;
    }
    return err;
}

static void
pool_free(struct pool *p)
{
    pthread_cond_destroy(&p->work);
    pthread_cond_destroy(&p->ended);
    pthread_cond_destroy(&p->finish);
    pthread_mutex_destroy(&p->lock);
    PyMem_RawFree(p);
}

/* Drop one reference to the pool; the mutex is held on entry and released. */
static void
pool_unref_locked(struct pool *p)
{
    bool last = --p->refs == 0;
    pthread_mutex_unlock(&p->lock);
    if (last)
        pool_free(p);
}

/* The next job, or NULL when this thread should end: the pool closes with an empty queue,
 * or no job came for idle_time. Called and returns with the mutex held. */
static struct job *
take_job(struct pool *p)
{
    struct timespec deadline;
    bool have_deadline = false;
    while (p->queue_head == NULL) {
        if (p->closing)
            return NULL;
        int rc;
        p->idle++;
        if (p->idle_forever) {
            rc = pthread_cond_wait(&p->work, &p->lock);
        }
        else {
            if (!have_deadline) {
                clock_gettime(CLOCK_MONOTONIC, &deadline);
                deadline.tv_sec += p->idle_time.tv_sec;
                deadline.tv_nsec += p->idle_time.tv_nsec;
                if (deadline.tv_nsec >= 1000000000L) {
                    deadline.tv_sec++;
                    deadline.tv_nsec -= 1000000000L;
                }
                have_deadline = true;
            }
            rc = pthread_cond_timedwait(&p->work, &p->lock, &deadline);
        }
        p->idle--;
        if (rc == ETIMEDOUT && p->queue_head == NULL)
            return NULL;
    }
    struct job *j = p->queue_head;
    p->queue_head = j->next;
    if (p->queue_head == NULL)
        p->queue_tail = NULL;
    j->next = NULL;
    p->queued--;
    p->running++;
    return j;
}

static void *
worker(void *arg)
{
    struct pool *p = arg;
    const uint64_t one = 1;
    pthread_mutex_lock(&p->lock);
    for (;;) {
        struct job *j = take_job(p);
        if (j == NULL)
            break;
        pthread_mutex_unlock(&p->lock);
        copy_rows(j);
        if (j->flip)
            j->error = flip(j);
        pthread_mutex_lock(&p->lock);
        p->running--;
        if (p->done_tail != NULL)
            p->done_tail->next = j;
        else
            p->done_head = j;
        p->done_tail = j;
        j->done = true;
        bool waited_for = p->waiters > 0;
        /* A flip that went well is reaped with its DRM event when the loop is quiet; quiet
         * is read here, under the mutex, as the setter writes it (see set_quiet). */
        bool wake = !(j->flip && j->error == 0 && p->quiet);
        p->signalled |= wake;
        pthread_mutex_unlock(&p->lock);
        if (waited_for)  /* (a waiter looks at done under the mutex before it sleeps) */
            pthread_cond_broadcast(&p->finish);
        /* Cannot fail but for a counter at 2**64-2 (it is read at every wake-up). */
        while (wake && write(p->efd, &one, sizeof one) < 0 && errno == EINTR)
            ;
        pthread_mutex_lock(&p->lock);
    }
    p->live--;
    pthread_cond_broadcast(&p->ended);
    pool_unref_locked(p);
    return NULL;
}

/* Start a detached worker with every signal blocked; 0 or an errno value. */
static int
start_thread(struct pool *p)
{
    pthread_attr_t attr;
    pthread_t thread;
    sigset_t all, old;
    int err = pthread_attr_init(&attr);
    if (err)
        return err;
    err = pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (!err) {
        sigfillset(&all);
        pthread_sigmask(SIG_BLOCK, &all, &old);
        err = pthread_create(&thread, &attr, worker, p);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    }
    pthread_attr_destroy(&attr);
    return err;
}

/* ---- the Python side: GIL held ---- */

/* Take a job out of the queue: true if it was there. Mutex held. */
static bool
unqueue(struct pool *p, struct job *j)
{
    struct job *prev = NULL;
    for (struct job *k = p->queue_head; k != NULL; prev = k, k = k->next) {
        if (k != j)
            continue;
        if (prev != NULL)
            prev->next = k->next;
        else
            p->queue_head = k->next;
        if (p->queue_tail == k)
            p->queue_tail = prev;
        p->queued--;
        return true;
    }
    return false;
}

static void
link_job(CopyThreadsObject *self, struct job *j)
{
    j->all_prev = NULL;
    j->all_next = self->jobs;
    if (self->jobs != NULL)
        self->jobs->all_prev = j;
    self->jobs = j;
}

/* Unlink, release both exports and free a job no thread will touch again. */
static void
reap_job(CopyThreadsObject *self, struct job *j)
{
    if (j->all_prev != NULL)
        j->all_prev->all_next = j->all_next;
    else
        self->jobs = j->all_next;
    if (j->all_next != NULL)
        j->all_next->all_prev = j->all_prev;
    PyBuffer_Release(&j->src_view);
    PyBuffer_Release(&j->dst_view);
    if (j->flip)
        PyBuffer_Release(&j->flip_view);
    PyMem_Free(j);
}

/* [(job_id, errno), ...] of a chain of finished jobs (linked by next), in its order. */
static PyObject *
finished_list(struct job *done)
{
    Py_ssize_t n = 0;
    for (struct job *j = done; j != NULL; j = j->next)
        n++;
    PyObject *list = PyList_New(n);
    Py_ssize_t i = 0;
    for (struct job *j = done; list != NULL && j != NULL; j = j->next, i++) {
        PyObject *entry = Py_BuildValue("(Ki)", (unsigned long long)j->id, j->error);
        if (entry == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, i, entry);
    }
    return list;
}

static bool
forked(CopyThreadsObject *self)
{
    return self->fork_generation != fork_generation;
}

/* 0 in the process that made the object; else -1 with RuntimeError. */
static int
check_same_process(CopyThreadsObject *self)
{
    if (forked(self)) {
        PyErr_SetString(PyExc_RuntimeError,
                        "CopyThreads was made in the parent process: its threads are not here");
        return -1;
    }
    return 0;
}

/* 0 when jobs may be submitted; else -1 with RuntimeError. */
static int
check_usable(CopyThreadsObject *self)
{
    if (check_same_process(self) < 0)
        return -1;
    if (self->state != OPEN) {
        PyErr_SetString(PyExc_RuntimeError, "CopyThreads is closed");
        return -1;
    }
    return 0;
}

/* In a forked child: no thread of ours runs, the mutex may be held forever. Release the
 * exports, close the eventfd and leave the pool (and its mutex) alone. */
static void
close_in_child(CopyThreadsObject *self)
{
    while (self->jobs != NULL)
        reap_job(self, self->jobs);
    if (self->pool != NULL && self->state != CLOSED)
        close(self->pool->efd);
    self->pool = NULL;
    self->state = CLOSED;
}

/* close(): let the threads copy every queued job and end, wait for them with the GIL
 * released, release every remaining export, close the eventfd. Always closes; when unreaped
 * is not NULL it is set to the [(job_id, errno), ...] finished() has not returned (a new
 * list, [] when another call closes or closed), or to NULL with MemoryError. */
static void
close_pool(CopyThreadsObject *self, PyObject **unreaped)
{
    struct pool *p = self->pool;
    if (unreaped != NULL)
        *unreaped = NULL;
    if (self->state == CLOSED || p == NULL || forked(self)) {
        if (self->state != CLOSED && p != NULL)
            close_in_child(self);
        if (unreaped != NULL)
            *unreaped = PyList_New(0);
        return;
    }
    bool first = self->state == OPEN;
    self->state = CLOSING;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&p->lock);
    p->closing = true;
    pthread_cond_broadcast(&p->work);
    while (p->live > 0)
        pthread_cond_wait(&p->ended, &p->lock);
    pthread_mutex_unlock(&p->lock);
    Py_END_ALLOW_THREADS
    if (!first) {  /* the first close() (another Python thread) releases and closes */
        if (unreaped != NULL)
            *unreaped = PyList_New(0);
        return;
    }
    /* No thread is alive: each ended with the queue empty, so every job is finished, and
     * every job not yet reaped is in the finished list. */
    pthread_mutex_lock(&p->lock);
    struct job *done = p->done_head;
    p->done_head = p->done_tail = NULL;
    pthread_mutex_unlock(&p->lock);
    if (unreaped != NULL)
        *unreaped = finished_list(done);
    while (self->jobs != NULL)
        reap_job(self, self->jobs);
    close(p->efd);
    p->efd = -1;
    self->state = CLOSED;
}

static PyObject *
CopyThreads_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"max_threads", "idle_seconds", NULL};
    PyObject *max_obj;
    double idle_seconds = 10.0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|d:CopyThreads", kwlist, &max_obj,
                                     &idle_seconds))
        return NULL;
    if (!PyLong_Check(max_obj)) {
        PyErr_Format(PyExc_TypeError, "max_threads must be an int, not %.100s",
                     Py_TYPE(max_obj)->tp_name);
        return NULL;
    }
    int overflow;
    long max_threads = PyLong_AsLongAndOverflow(max_obj, &overflow);
    if (max_threads == -1 && PyErr_Occurred())
        return NULL;
    if (overflow || max_threads < 1 || max_threads > MAX_THREADS_LIMIT) {
        PyErr_Format(PyExc_ValueError, "max_threads must be 1 to %d, not %S",
                     MAX_THREADS_LIMIT, max_obj);
        return NULL;
    }
    if (!(idle_seconds > 0)) {  /* NaN too */
        PyObject *shown = PyFloat_FromDouble(idle_seconds);
        if (shown != NULL) {
            PyErr_Format(PyExc_ValueError, "idle_seconds must be positive, not %R", shown);
            Py_DECREF(shown);
        }
        return NULL;
    }

    struct pool *p = PyMem_RawCalloc(1, sizeof *p);
    if (p == NULL)
        return PyErr_NoMemory();
    pthread_condattr_t cattr;
    int err = pthread_condattr_init(&cattr);
    if (!err)
        err = pthread_condattr_setclock(&cattr, CLOCK_MONOTONIC);
    if (!err)
        err = pthread_mutex_init(&p->lock, NULL);
    if (!err) {
        err = pthread_cond_init(&p->work, &cattr);
        if (!err) {
            err = pthread_cond_init(&p->ended, NULL);
            if (!err) {
                err = pthread_cond_init(&p->finish, NULL);
                if (err)
                    pthread_cond_destroy(&p->ended);
            }
            if (err)
                pthread_cond_destroy(&p->work);
        }
        if (err)
            pthread_mutex_destroy(&p->lock);
    }
    pthread_condattr_destroy(&cattr);
    if (err) {
        PyMem_RawFree(p);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (isinf(idle_seconds)) {
        p->idle_forever = true;
    }
    else {
        double whole = floor(idle_seconds);
        /* Past ~30 years a thread is as good as never ending: keep time_t from overflowing. */
        if (whole > 1e9)
            whole = 1e9;
        p->idle_time.tv_sec = (time_t)whole;
        p->idle_time.tv_nsec = (long)((idle_seconds - floor(idle_seconds)) * 1e9);
        if (p->idle_time.tv_nsec >= 1000000000L)
            p->idle_time.tv_nsec = 999999999L;
        if (p->idle_time.tv_sec == 0 && p->idle_time.tv_nsec == 0)
            p->idle_time.tv_nsec = 1;
    }
    p->refs = 1;
    p->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (p->efd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        pool_free(p);
        return NULL;
    }

    CopyThreadsObject *self = (CopyThreadsObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        close(p->efd);
        pool_free(p);
        return NULL;
    }
    self->pool = p;
    self->jobs = NULL;
    self->max_threads = (unsigned)max_threads;
    self->quiet = false;
    self->state = OPEN;
    self->fork_generation = fork_generation;
    return (PyObject *)self;
}

static int
CopyThreads_traverse(CopyThreadsObject *self, visitproc visit, void *arg)
{
    /* Only finished jobs: GC may clear (release) what it visits, and a queued or running
     * job's buffer must stay whole under its thread. A cycle through a job that is still
     * copying is collected by a later pass, once the job finished. */
    struct pool *p = self->pool;
    if (p == NULL || self->state == CLOSED || forked(self))
        return 0;
    int r = 0;
    pthread_mutex_lock(&p->lock);
    for (struct job *j = p->done_head; j != NULL && r == 0; j = j->next) {
        if (j->src_view.obj != NULL)
            r = visit(j->src_view.obj, arg);
        if (r == 0 && j->dst_view.obj != NULL)
            r = visit(j->dst_view.obj, arg);
        if (r == 0 && j->flip && j->flip_view.obj != NULL)
            r = visit(j->flip_view.obj, arg);
    }
    pthread_mutex_unlock(&p->lock);
    return r;
}

static int
CopyThreads_clear(CopyThreadsObject *self)
{
    close_pool(self, NULL);
    return 0;
}

static void
CopyThreads_dealloc(CopyThreadsObject *self)
{
    PyObject_GC_UnTrack(self);
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    close_pool(self, NULL);
    struct pool *p = self->pool;
    if (p != NULL && !forked(self)) {
        pthread_mutex_lock(&p->lock);
        pool_unref_locked(p);
    }
    self->pool = NULL;
    PyErr_Restore(type, value, tb);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A geometry value as int64; beyond its range as INT64_MIN/INT64_MAX (such a value is
 * either negative or ends the frame beyond any buffer, but for the pitch of a one-row frame,
 * which is not used). */
static int
geometry_value(PyObject *obj, int64_t *out)
{
    PyObject *index = PyNumber_Index(obj);
    if (index == NULL)
        return -1;
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(index, &overflow);
    Py_DECREF(index);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (overflow > 0)
        v = INT64_MAX;
    else if (overflow < 0)
        v = INT64_MIN;
    *out = v;
    return 0;
}

/* pixels._check_geometry's rules; the objects are the caller's, for the messages. */
static int
check_geometry(const char *what, Py_ssize_t size, int64_t offset, int64_t pitch, int64_t width,
               int64_t height, PyObject *offset_obj, PyObject *pitch_obj, PyObject *width_obj,
               PyObject *height_obj)
{
    if (offset < 0 || pitch < 0 || width < 0 || height < 0) {
        PyErr_Format(PyExc_ValueError,
                     "%s: negative geometry (offset %S, pitch %S, width %S bytes, height %S)",
                     what, offset_obj, pitch_obj, width_obj, height_obj);
        return -1;
    }
    if (height > 1 && width > pitch) {
        PyErr_Format(PyExc_ValueError, "%s: rows of %S bytes overlap at pitch %S", what,
                     width_obj, pitch_obj);
        return -1;
    }
    int64_t end = offset, rows;
    if (height > 0 && width > 0 &&
        (__builtin_mul_overflow(pitch, height - 1, &rows) ||
         __builtin_add_overflow(offset, rows, &end) ||
         __builtin_add_overflow(end, width, &end))) {
        PyErr_Format(PyExc_ValueError,
                     "%s: frame ends beyond byte %lld (offset %S + pitch %S x (%S - 1) + %S) "
                     "but the buffer holds %zd bytes",
                     what, (long long)INT64_MAX, offset_obj, pitch_obj, height_obj, width_obj,
                     size);
        return -1;
    }
    if (end > size) {
        PyErr_Format(PyExc_ValueError,
                     "%s: frame ends at byte %lld (offset %S + pitch %S x %lld + %S) "
                     "but the buffer holds %zd bytes",
                     what, (long long)end, offset_obj, pitch_obj,
                     (long long)(height - 1), width_obj, size);
        return -1;
    }
    return 0;
}

/* submit()'s flip: None (false), or (fd, request, arg) checked, arg not yet exported (true).
 * -1 with TypeError, ValueError or OverflowError. */
static int
parse_flip(PyObject *flip, int *fd, unsigned long *request, PyObject **arg)
{
    if (flip == Py_None)
        return 0;
    if (!PyTuple_Check(flip) || PyTuple_GET_SIZE(flip) != 3) {
        PyErr_Format(PyExc_TypeError,
                     "CopyThreads.submit: flip must be None or (fd, request, arg), not %.100s",
                     PyTuple_Check(flip) ? "a tuple of another length" : Py_TYPE(flip)->tp_name);
        return -1;
    }
    PyObject *fd_obj = PyTuple_GET_ITEM(flip, 0), *request_obj = PyTuple_GET_ITEM(flip, 1);
    if (!PyLong_Check(fd_obj) || !PyLong_Check(request_obj)) {
        PyErr_Format(PyExc_TypeError,
                     "CopyThreads.submit: the flip's fd and request must be ints, not %.100s "
                     "and %.100s", Py_TYPE(fd_obj)->tp_name, Py_TYPE(request_obj)->tp_name);
        return -1;
    }
    int overflow;
    long fd_value = PyLong_AsLongAndOverflow(fd_obj, &overflow);
    if (fd_value == -1 && PyErr_Occurred())
        return -1;
    if (overflow < 0 || fd_value < 0) {
        PyErr_Format(PyExc_ValueError, "CopyThreads.submit: negative flip fd %S", fd_obj);
        return -1;
    }
    if (overflow > 0 || fd_value > INT_MAX) {
        PyErr_Format(PyExc_OverflowError, "CopyThreads.submit: flip fd %S is beyond %d",
                     fd_obj, INT_MAX);
        return -1;
    }
    *request = PyLong_AsUnsignedLong(request_obj);
    if (*request == (unsigned long)-1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Format(PyExc_OverflowError,
                         "CopyThreads.submit: flip request %S is not 0 to %lu", request_obj,
                         ULONG_MAX);
        }
        return -1;
    }
    *fd = (int)fd_value;
    *arg = PyTuple_GET_ITEM(flip, 2);
    return 1;
}

PyDoc_STRVAR(submit_doc,
"submit(job_id, src, src_offset, src_pitch, dst, dst_offset, dst_pitch, width_bytes, height,\n"
"       flip=None)\n"
"--\n"
"\n"
"Queue a copy of height rows of width_bytes bytes, row r from src[src_offset + r*src_pitch]\n"
"to dst[dst_offset + r*dst_pitch]. Checked first, with pixels.copy_frame's rules\n"
"(ValueError, nothing queued). The buffer exports are held until finished() returns\n"
"job_id (or close()). RuntimeError when closed; OSError when no thread is alive and none\n"
"could be started (nothing queued).\n"
"\n"
"flip=(fd, request, arg): right after the copy, on its thread, ioctl(fd, request, arg)\n"
"(a KMS page flip into the buffer just copied, without an event-loop pass between), tried\n"
"up to 100 times while it fails with EINTR or EAGAIN; finished() reports its errno. arg is\n"
"a writable buffer, held as src and dst, at least as large as the size request encodes\n"
"(ValueError). A flip that succeeds does not make fileno() readable while quiet is true.");

static PyObject *
CopyThreads_submit(CopyThreadsObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"job_id",     "src",       "src_offset",  "src_pitch",
                             "dst",        "dst_offset", "dst_pitch", "width_bytes",
                             "height",     "flip",      NULL};
    PyObject *id_obj, *src, *dst, *src_offset_obj, *src_pitch_obj, *dst_offset_obj,
        *dst_pitch_obj, *width_obj, *height_obj, *flip_obj = Py_None, *flip_arg = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOOOO|O:submit", kwlist, &id_obj, &src,
                                     &src_offset_obj, &src_pitch_obj, &dst, &dst_offset_obj,
                                     &dst_pitch_obj, &width_obj, &height_obj, &flip_obj))
        return NULL;
    if (check_usable(self) < 0)
        return NULL;
    if (!PyLong_Check(id_obj)) {
        PyErr_Format(PyExc_TypeError, "job_id must be an int, not %.100s",
                     Py_TYPE(id_obj)->tp_name);
        return NULL;
    }
    uint64_t id = PyLong_AsUnsignedLongLong(id_obj);  /* OverflowError: negative, >= 2**64 */
    if (id == (uint64_t)-1 && PyErr_Occurred())
        return NULL;
    int64_t src_offset, src_pitch, dst_offset, dst_pitch, width, height;
    if (geometry_value(src_offset_obj, &src_offset) < 0 ||
        geometry_value(src_pitch_obj, &src_pitch) < 0 ||
        geometry_value(dst_offset_obj, &dst_offset) < 0 ||
        geometry_value(dst_pitch_obj, &dst_pitch) < 0 ||
        geometry_value(width_obj, &width) < 0 || geometry_value(height_obj, &height) < 0)
        return NULL;
    int flip_fd = -1;
    unsigned long flip_request = 0;
    int has_flip = parse_flip(flip_obj, &flip_fd, &flip_request, &flip_arg);
    if (has_flip < 0)
        return NULL;

    struct job *j = PyMem_Malloc(sizeof *j);
    if (j == NULL)
        return PyErr_NoMemory();
    if (PyObject_GetBuffer(src, &j->src_view, PyBUF_SIMPLE) < 0)
        goto free_job;
    /* PyBUF_SIMPLE, then readonly: a read-only destination is a ValueError, as in
     * copy_frame, not the BufferError a PyBUF_WRITABLE request raises. */
    if (PyObject_GetBuffer(dst, &j->dst_view, PyBUF_SIMPLE) < 0)
        goto release_src;
    if (j->dst_view.readonly) {
        PyErr_SetString(PyExc_ValueError,
                        "CopyThreads.submit: the destination buffer is read-only");
        goto release_both;
    }
    /* PyBUF_WRITABLE: the kernel writes into arg (BufferError when it is read-only). */
    j->flip = has_flip;
    if (has_flip && PyObject_GetBuffer(flip_arg, &j->flip_view, PyBUF_WRITABLE) < 0)
        goto release_both;
    if (check_geometry("CopyThreads.submit source", j->src_view.len, src_offset, src_pitch,
                       width, height, src_offset_obj, src_pitch_obj, width_obj,
                       height_obj) < 0 ||
        check_geometry("CopyThreads.submit destination", j->dst_view.len, dst_offset,
                       dst_pitch, width, height, dst_offset_obj, dst_pitch_obj, width_obj,
                       height_obj) < 0)
        goto release_all;
#ifdef _IOC_SIZE
    /* A request that encodes a direction (a DRM one does) makes the kernel read or write
     * that many bytes at arg (it sees the request as 32 bits). Older requests encode none. */
    unsigned int request32 = (unsigned int)flip_request;
    if (has_flip && _IOC_DIR(request32) != _IOC_NONE &&
        j->flip_view.len < (Py_ssize_t)_IOC_SIZE(request32)) {
        char shown[32];  /* PyErr_Format has no %#lx */
        PyOS_snprintf(shown, sizeof shown, "%#lx", flip_request);
        PyErr_Format(PyExc_ValueError,
                     "CopyThreads.submit: flip request %s moves %u bytes but its arg holds "
                     "%zd", shown, (unsigned)_IOC_SIZE(request32), j->flip_view.len);
        goto release_all;
    }
#endif

    j->next = NULL;
    j->id = id;
    j->error = 0;
    j->done = false;
    j->flip_fd = flip_fd;
    j->flip_request = flip_request;
    j->flip_arg = has_flip ? j->flip_view.buf : NULL;
    j->src = (const unsigned char *)j->src_view.buf + src_offset;
    j->dst = (unsigned char *)j->dst_view.buf + dst_offset;
    j->src_pitch = (size_t)src_pitch;
    j->dst_pitch = (size_t)dst_pitch;
    j->width = (size_t)width;
    j->height = (size_t)height;
    link_job(self, j);

    struct pool *p = self->pool;
    pthread_mutex_lock(&p->lock);
    if (p->queue_tail != NULL)
        p->queue_tail->next = j;
    else
        p->queue_head = j;
    p->queue_tail = j;
    p->queued++;
    bool wake = p->idle > 0;
    /* A thread is started when the waiting threads are fewer than the jobs waiting for one
     * (a thread signalled but not yet awake still counts as waiting, and takes one job). */
    bool start = p->queued > p->idle && p->live < self->max_threads;
    if (start) {
        p->live++;
        p->refs++;
    }
    pthread_mutex_unlock(&p->lock);
    /* After the unlock: the woken thread does not block on a mutex still held here. The job
     * is queued, and a waiter looks at the queue under the mutex before it sleeps: no wake-up
     * is lost. */
    if (wake)
        pthread_cond_signal(&p->work);
    if (!start)
        Py_RETURN_NONE;

    int err = start_thread(p);
    if (err == 0)
        Py_RETURN_NONE;
    pthread_mutex_lock(&p->lock);
    p->live--;
    p->refs--;  /* the object's reference remains */
    /* No thread alive: none will take it, take it back. (Not in the queue: a thread that
     * has ended since took and finished it; finished() returns it.) */
    bool orphan = p->live == 0 && unqueue(p, j);
    pthread_mutex_unlock(&p->lock);
    if (!orphan)
        Py_RETURN_NONE;  /* a live thread copies it later */
    reap_job(self, j);
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError);

release_all:
    if (has_flip)
        PyBuffer_Release(&j->flip_view);
release_both:
    PyBuffer_Release(&j->dst_view);
release_src:
    PyBuffer_Release(&j->src_view);
free_job:
    PyMem_Free(j);
    return NULL;
}

/* Wait, GIL released, until no job given with this id is queued or running; at once when
 * there is none or the pool is closing or closed. The jobs are looked at with the GIL held
 * (another Python thread may reap and free them meanwhile) and their done flag under the
 * mutex, held from the look until the wait: a job that finishes in between is seen. */
static void
wait_for_job(CopyThreadsObject *self, uint64_t id)
{
    struct pool *p = self->pool;
    while (self->state == OPEN) {
        pthread_mutex_lock(&p->lock);
        bool pending = false;
        for (struct job *j = self->jobs; j != NULL && !pending; j = j->all_next)
            pending = j->id == id && !j->done;
        if (!pending) {
            pthread_mutex_unlock(&p->lock);
            return;
        }
        p->waiters++;
        Py_BEGIN_ALLOW_THREADS
        pthread_cond_wait(&p->finish, &p->lock);
        p->waiters--;
        pthread_mutex_unlock(&p->lock);
        Py_END_ALLOW_THREADS
    }
}

PyDoc_STRVAR(finished_doc,
"finished(wait_for=None) -> list[tuple[int, int]]\n"
"--\n"
"\n"
"(job_id, errno) of the copies finished since the last call, in finish order; their buffer\n"
"exports are released. errno is that of the job's flip, 0 when it succeeded or the job had\n"
"none. Never blocks (reads the eventfd, which may have nothing), but for wait_for=job_id:\n"
"while a job given with that id is queued or running, first wait for it to finish (GIL\n"
"released; not once closing), so that a loop that needs a quiet flip done now has it. []\n"
"once closed.");

static PyObject *
CopyThreads_finished(CopyThreadsObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"wait_for", NULL};
    PyObject *wait_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|O:finished", kwlist, &wait_obj))
        return NULL;
    uint64_t wait_id = 0;
    if (wait_obj != Py_None) {
        if (!PyLong_Check(wait_obj)) {
            PyErr_Format(PyExc_TypeError, "wait_for must be None or an int, not %.100s",
                         Py_TYPE(wait_obj)->tp_name);
            return NULL;
        }
        wait_id = PyLong_AsUnsignedLongLong(wait_obj);  /* OverflowError, as for job_id */
        if (wait_id == (uint64_t)-1 && PyErr_Occurred())
            return NULL;
    }
    if (self->state == CLOSED)
        return PyList_New(0);
    if (check_same_process(self) < 0)
        return NULL;
    if (wait_obj != Py_None) {
        wait_for_job(self, wait_id);
        if (self->state == CLOSED)  /* by another Python thread meanwhile */
            return PyList_New(0);
    }
    struct pool *p = self->pool;
    uint64_t count;
    /* First clear the eventfd, then take the list: a job finished after this read writes
     * again, so none is left behind without the eventfd readable (but a quiet flip's, which
     * the loop reaps on its DRM event, or when quiet is set false). EAGAIN: nothing new.
     * With wait_for (a loop settling a quiet flip, on every such flip) the read, a system
     * call, is made only when the eventfd may hold something: when a job signalled it since
     * the flag was last cleared. A write in flight past a clearing call's read leaves
     * the eventfd readable with the flag clear: the reaper's call (without wait_for) always
     * reads, so it wakes once more for nothing and clears it. */
    pthread_mutex_lock(&p->lock);
    bool signalled = p->signalled;
    p->signalled = false;
    pthread_mutex_unlock(&p->lock);
    if (signalled || wait_obj == Py_None) {
        while (read(p->efd, &count, sizeof count) < 0 && errno == EINTR)
            ;
    }
    pthread_mutex_lock(&p->lock);
    struct job *done = p->done_head;
    struct job *last = p->done_tail;
    p->done_head = p->done_tail = NULL;
    pthread_mutex_unlock(&p->lock);

    PyObject *ids = finished_list(done);
    if (ids == NULL) {
        if (done != NULL) {  /* put them back in front, for the next call */
            pthread_mutex_lock(&p->lock);
            last->next = p->done_head;
            p->done_head = done;
            if (p->done_tail == NULL)
                p->done_tail = last;
            pthread_mutex_unlock(&p->lock);
        }
        return NULL;
    }
    while (done != NULL) {
        struct job *next = done->next;
        reap_job(self, done);
        done = next;
    }
    return ids;
}

PyDoc_STRVAR(fileno_doc,
"fileno() -> int\n"
"--\n"
"\n"
"The eventfd, readable when a copy has finished. ValueError once closed.");

static PyObject *
CopyThreads_fileno(CopyThreadsObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->state != OPEN) {
        PyErr_SetString(PyExc_ValueError, "fileno of a closed CopyThreads");
        return NULL;
    }
    if (check_same_process(self) < 0)
        return NULL;
    return PyLong_FromLong(self->pool->efd);
}

PyDoc_STRVAR(close_doc,
"close() -> list[tuple[int, int]]\n"
"--\n"
"\n"
"Copy every queued job, end the threads (waiting with the GIL released), release every\n"
"remaining buffer export and close the eventfd. Returns (job_id, errno) of the jobs\n"
"finished() has not returned, in finish order; [] when already closed.");

static PyObject *
CopyThreads_close(CopyThreadsObject *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *unreaped;
    close_pool(self, &unreaped);
    return unreaped;
}

static PyObject *
CopyThreads_enter(CopyThreadsObject *self, PyObject *Py_UNUSED(ignored))
{
    return Py_NewRef(self);
}

static PyObject *
CopyThreads_exit(CopyThreadsObject *self, PyObject *Py_UNUSED(args))
{
    close_pool(self, NULL);
    Py_RETURN_NONE;
}

enum counter { THREADS, QUEUED, RUNNING };

/* A counter of the pool, read under its mutex; 0 once closed. */
static PyObject *
pool_counter(CopyThreadsObject *self, enum counter which)
{
    if (self->state == CLOSED)
        return PyLong_FromLong(0);
    if (check_same_process(self) < 0)
        return NULL;
    struct pool *p = self->pool;
    pthread_mutex_lock(&p->lock);
    size_t value = which == THREADS ? p->live : which == QUEUED ? p->queued : p->running;
    pthread_mutex_unlock(&p->lock);
    return PyLong_FromSize_t(value);
}

static PyObject *
CopyThreads_get_threads(CopyThreadsObject *self, void *Py_UNUSED(closure))
{
    return pool_counter(self, THREADS);
}

static PyObject *
CopyThreads_get_queued(CopyThreadsObject *self, void *Py_UNUSED(closure))
{
    return pool_counter(self, QUEUED);
}

static PyObject *
CopyThreads_get_running(CopyThreadsObject *self, void *Py_UNUSED(closure))
{
    return pool_counter(self, RUNNING);
}

static PyObject *
CopyThreads_get_quiet(CopyThreadsObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->quiet);
}

/* quiet = False makes the eventfd readable when jobs finished quietly wait to be reaped:
 * the loop's reaper takes them. Under the mutex, as a thread that finishes a job reads it. */
static int
CopyThreads_set_quiet(CopyThreadsObject *self, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL || !PyBool_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "CopyThreads.quiet must be a bool");
        return -1;
    }
    if (self->state != CLOSED && check_same_process(self) < 0)
        return -1;
    bool quiet = value == Py_True;
    self->quiet = quiet;
    if (self->state == CLOSED)
        return 0;
    struct pool *p = self->pool;
    pthread_mutex_lock(&p->lock);
    p->quiet = quiet;
    bool wake = !quiet && p->done_head != NULL;
    p->signalled |= wake;
    pthread_mutex_unlock(&p->lock);
    const uint64_t one = 1;
    while (wake && write(p->efd, &one, sizeof one) < 0 && errno == EINTR)
        ;
    return 0;
}

static PyMethodDef CopyThreads_methods[] = {
    {"submit", (PyCFunction)(void (*)(void))CopyThreads_submit, METH_VARARGS | METH_KEYWORDS,
     submit_doc},
    {"finished", (PyCFunction)(void (*)(void))CopyThreads_finished,
     METH_VARARGS | METH_KEYWORDS, finished_doc},
    {"fileno", (PyCFunction)CopyThreads_fileno, METH_NOARGS, fileno_doc},
    {"close", (PyCFunction)CopyThreads_close, METH_NOARGS, close_doc},
    {"__enter__", (PyCFunction)CopyThreads_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)CopyThreads_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef CopyThreads_getset[] = {
    {"threads", (getter)CopyThreads_get_threads, NULL, "worker threads alive now", NULL},
    {"queued", (getter)CopyThreads_get_queued, NULL, "jobs not yet taken by a thread", NULL},
    {"running", (getter)CopyThreads_get_running, NULL, "jobs being copied now", NULL},
    {"quiet", (getter)CopyThreads_get_quiet, (setter)CopyThreads_set_quiet,
     "True: a job whose flip succeeded does not make fileno() readable (it is reaped later);\n"
     "set False, fileno() is readable if a finished job waits. False at first.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(CopyThreads_doc,
"CopyThreads(max_threads, idle_seconds=10.0)\n"
"--\n"
"\n"
"Up to max_threads (1 to 256) native threads copying rows between buffers, each copy\n"
"optionally followed by a KMS page flip on the same thread; a thread is started when a job\n"
"finds no idle one and ends after idle_seconds without a job. fileno() is an eventfd,\n"
"readable when finished() has jobs to return (but those finished quietly, see quiet).");

static PyTypeObject CopyThreadsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "displback.backend._copythreads.CopyThreads",
    .tp_doc = CopyThreads_doc,
    .tp_basicsize = sizeof(CopyThreadsObject),
    .tp_itemsize = 0,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = CopyThreads_new,
    .tp_dealloc = (destructor)CopyThreads_dealloc,
    .tp_traverse = (traverseproc)CopyThreads_traverse,
    .tp_clear = (inquiry)CopyThreads_clear,
    .tp_methods = CopyThreads_methods,
    .tp_getset = CopyThreads_getset,
};

static struct PyModuleDef copythreads_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "displback.backend._copythreads",
    .m_doc = module_doc,
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__copythreads(void)
{
    static bool atfork_registered;
    if (!atfork_registered) {
        int err = pthread_atfork(NULL, NULL, after_fork_in_child);
        if (err) {
            errno = err;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        atfork_registered = true;
    }
    if (PyType_Ready(&CopyThreadsType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&copythreads_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "CopyThreads", (PyObject *)&CopyThreadsType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
