/*
 * fdtrack.c - the table of descriptors libzmq owns, the wrappers that keep it
 * (patched into libzmq's GOT by elfhook.c), and descriptor tracking's part of
 * the fork handlers.
 *
 * Contract: see zmqfork.h (exported functions) and internal.h (handlers).
 *
 * Invariants
 *   - A descriptor is in the table iff a hooked call of the hooked object
 *     created it (or dup2/dup3'd onto it) and no hooked close() removed it.
 *   - close() removes the number from the table *before* the real close, so a
 *     number another thread gets back from the kernel right after is never in
 *     the table by mistake.
 *   - The real call and its table update happen inside the *gate*; the
 *     prepare handler closes the gate and waits until no call of another
 *     thread is inside, so in the child the table says exactly which
 *     descriptors are libzmq's (but see the signal-handler case below).
 *
 * The gate: the count in `gate` is the calls inside; `pending` counts forks
 *   between their prepare and parent handlers.  A call increments the count,
 *   then checks `pending`; if a fork is pending it backs out and sleeps on a
 *   futex until the parent handler reopens the gate.  Prepare increments
 *   `pending`, then sleeps until the count is zero (but see the signal-handler
 *   case below).  Both sides store, then
 *   load, with sequentially consistent atomics, so at least one sees the
 *   other.  Only atomics and futex syscalls: async-signal-safe, no
 *   allocation, no locks a dead thread could hold.  A hooked call that blocks
 *   (accept on a blocking listener, open of a FIFO) would hold a fork back
 *   until it returns; libzmq makes all of these calls on non-blocking
 *   descriptors.
 *
 * Fork from a signal handler that interrupted a hooked call: the forking
 *   thread is itself inside the gate and cannot leave it before the fork
 *   returns.  Each thread counts the calls it is inside (`gate_depth`,
 *   initial-exec TLS), so prepare waits for the count to fall to that depth
 *   instead of zero.  The depth is raised before the thread's increment and
 *   lowered after its decrement, so it never undercounts (no hang); if the
 *   signal lands between the two, one call of another thread may still be
 *   inside at the fork, which can only leave its descriptor open, untracked,
 *   in the child (never close one that is not libzmq's).  In the child, the
 *   interrupted call resumes after the cleanup: the cleanup starts a new
 *   epoch of the gate, and a call that entered in an older one leaves without
 *   decrementing (see `gate`), so the child's count stays right.  The
 *   resumed call's own descriptor is libzmq's in the child as in the parent:
 *   a create tracks it there (it stays open in that child, closed in its
 *   children), a close closes the child's copy.  Not covered: a thread whose
 *   handler forks while *another* thread is in fork() waiting for it
 *   (glibc holds its atfork lock from the prepare handlers to the parent
 *   handlers, so the handler's fork waits for that fork, which waits for the
 *   interrupted call).
 *
 * Forks that skip the handlers (raw clone, _Fork): the child finds the gate
 *   in whatever state the parent's threads left it, and the fork was not
 *   atomic with hooked calls.  The wiped token tells: every hooked call first
 *   compares the token with `table_token` (the token under which the table
 *   was last made right); on a mismatch it runs zmqfork_refresh(), whose
 *   winner runs the cleanup (zmqfork__fdtrack_child), and waits until the
 *   cleanup is published.  So no descriptor made in such a child is tracked
 *   before the inherited ones are closed, and the cleanup can reset the gate:
 *   no thread of the child is inside it.  Limit: a hooked call that was in
 *   flight in the parent at the moment of such a fork can leave that one
 *   descriptor open, untracked, in the child.
 *
 * Lazy binding: in an object bound lazily (RTLD_LAZY without LD_BIND_NOW, or
 *   a C program's dlopen), a thread making its first call of a hooked
 *   function may have read the unresolved slot before the patch and have
 *   glibc's resolver store the plain function after it (_dl_fixup stores
 *   without a lock, so nothing can wait for it; dlopen(RTLD_NOW | RTLD_NOLOAD)
 *   of an object already loaded returns without relocating it).  So every
 *   patched slot in a writable page is *watched*: the prepare handler and the
 *   child cleanup put the wrapper back where the binder overwrote it, and if a
 *   close() slot was overwritten, the table is forgotten (emptied, counted as untracked)
 *   before anything is closed, since a number closed through the plain
 *   close() may have been reused.  The child checks its own copy of the slots,
 *   so an overwrite up to the very fork is seen.  What the binder can write
 *   is known at install: the slot's pre-patch value, and for a slot still
 *   unresolved then, the definitions dlsym() finds for it in the global scope
 *   and in the object's own (an RTLD_DEEPBIND object binds there first); the
 *   handlers only compare stored pointers.  Any other value is a later hook
 *   of someone else's, left alone, the table kept.  Cost of the rare case:
 *   libzmq's descriptors of that moment survive into children; creating calls
 *   made through an overwritten slot until the next fork are not tracked.
 *
 * The table: a bitmap indexed by descriptor number, mmap'd once at install
 *   and sized by the hard RLIMIT_NOFILE (capped), plus a few overflow slots
 *   for numbers beyond it; numbers beyond both are counted as untracked.
 */
#define _GNU_SOURCE
#include "zmqfork.h"
#include "internal.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* Published install outcome: written under install_lock, once. */
static int status = ZMQFORK_FDTRACK_ENOTINSTALLED;
static char reason[768] = "not installed";
static char object_name[4096];
static char functions[256];
static pthread_mutex_t install_lock = PTHREAD_MUTEX_INITIALIZER;

/* A failure: its code and message, built before anything is published. */
struct failure {
    int code;
    char message[sizeof reason];
};

static __attribute__((format(printf, 3, 4), unused)) int fail(struct failure *f, int code,
                                                      const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(f->message, sizeof f->message, fmt, ap);
    va_end(ap);
    f->code = code;
    return code;
}

#ifdef __linux__

#include <dlfcn.h>
#include <fcntl.h>
#include <limits.h>
#include <link.h>
#include <linux/futex.h>
#include <sched.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* ---- the table -------------------------------------------------------- */

#define TABLE_MIN_BITS 4096u
#define TABLE_MAX_BITS (1u << 24) /* 2 MiB of address space, touched only where used */
#define OVERFLOW_SLOTS 64

static uint64_t *bitmap;      /* NULL until install; then never changes */
static unsigned int nbits;    /* bitmap size in descriptors, a multiple of 64 */
static unsigned int high;     /* one more than the highest number ever tracked */
static int overflow[OVERFLOW_SLOTS];
static long tracked_now;
static long closed_last;
static long closed_total;
static long untracked;

/* Maps the table; returns 0 or an errno value. */
static int table_init(void)
{
    struct rlimit limit;
    uint64_t want = TABLE_MIN_BITS;
    if (getrlimit(RLIMIT_NOFILE, &limit) != 0 || limit.rlim_max == RLIM_INFINITY ||
        limit.rlim_max > TABLE_MAX_BITS)
        want = TABLE_MAX_BITS;
    else if (limit.rlim_max > want)
        want = limit.rlim_max;
    want = (want + 63) & ~(uint64_t)63;
    void *map = mmap(NULL, want / 8, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (map == MAP_FAILED)
        return errno;
    for (int i = 0; i < OVERFLOW_SLOTS; i++)
        overflow[i] = -1;
    nbits = (unsigned int)want;
    __atomic_store_n(&bitmap, (uint64_t *)map, __ATOMIC_RELEASE);
    return 0;
}

static void track(int fd)
{
    if (fd < 0)
        return;
    if ((unsigned int)fd < nbits) {
        /* `high` first: a fork between the two steps (from a signal handler,
         * or a raw clone) must not leave a set bit the cleanup does not scan. */
        unsigned int seen = __atomic_load_n(&high, __ATOMIC_RELAXED);
        while ((unsigned int)fd >= seen &&
               !__atomic_compare_exchange_n(&high, &seen, (unsigned int)fd + 1, 1,
                                            __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
        }
        uint64_t bit = (uint64_t)1 << (fd & 63);
        uint64_t old = __atomic_fetch_or(&bitmap[fd >> 6], bit, __ATOMIC_SEQ_CST);
        if (!(old & bit))
            __atomic_add_fetch(&tracked_now, 1, __ATOMIC_RELAXED);
        return;
    }
    for (int i = 0; i < OVERFLOW_SLOTS; i++) {
        int expected = -1;
        if (__atomic_compare_exchange_n(&overflow[i], &expected, fd, 0, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED)) {
            __atomic_add_fetch(&tracked_now, 1, __ATOMIC_RELAXED);
            return;
        }
        if (expected == fd)
            return;
    }
    __atomic_add_fetch(&untracked, 1, __ATOMIC_RELAXED);
}

static void untrack(int fd)
{
    if (fd < 0)
        return;
    if ((unsigned int)fd < nbits) {
        uint64_t bit = (uint64_t)1 << (fd & 63);
        uint64_t old = __atomic_fetch_and(&bitmap[fd >> 6], ~bit, __ATOMIC_RELAXED);
        if (old & bit)
            __atomic_sub_fetch(&tracked_now, 1, __ATOMIC_RELAXED);
        return;
    }
    for (int i = 0; i < OVERFLOW_SLOTS; i++) {
        int expected = fd;
        if (__atomic_compare_exchange_n(&overflow[i], &expected, -1, 0, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED)) {
            __atomic_sub_fetch(&tracked_now, 1, __ATOMIC_RELAXED);
            return;
        }
    }
}

static int is_tracked(int fd)
{
    if (fd < 0 || bitmap == NULL)
        return 0;
    if ((unsigned int)fd < nbits)
        return (__atomic_load_n(&bitmap[fd >> 6], __ATOMIC_RELAXED) >> (fd & 63)) & 1;
    for (int i = 0; i < OVERFLOW_SLOTS; i++)
        if (__atomic_load_n(&overflow[i], __ATOMIC_RELAXED) == fd)
            return 1;
    return 0;
}

/*
 * Empties the table without closing anything; what it held is counted as
 * untracked (those descriptors may now survive into a child).  For when the
 * table can no longer be trusted.  Async-signal-safe.
 */
static void forget_table(void)
{
    uint64_t *map = __atomic_load_n(&bitmap, __ATOMIC_ACQUIRE);
    if (map == NULL)
        return;
    long forgotten = 0;
    unsigned int words = (__atomic_load_n(&high, __ATOMIC_RELAXED) + 63) / 64;
    for (unsigned int w = 0; w < words; w++)
        forgotten += __builtin_popcountll(__atomic_exchange_n(&map[w], 0, __ATOMIC_RELAXED));
    for (int i = 0; i < OVERFLOW_SLOTS; i++)
        forgotten += __atomic_exchange_n(&overflow[i], -1, __ATOMIC_RELAXED) >= 0;
    __atomic_sub_fetch(&tracked_now, forgotten, __ATOMIC_RELAXED);
    __atomic_add_fetch(&untracked, forgotten, __ATOMIC_RELAXED);
}

/* ---- patched slots the loader may write again ---------------------------- */

/*
 * Every patched slot in a writable page: there, a lazy JUMP_SLOT resolution
 * that was in flight at install (the slot read before the patch, the
 * resolver's store after it) writes the plain function over the wrapper, and
 * nothing can wait for it (glibc's _dl_fixup stores without a lock).  Entries
 * are appended under install_lock, after their slots were patched for good,
 * and published by the release store of `nwatched`.  The handlers read these
 * slots, so a hooked object is made RTLD_NODELETE at install: a dlclose()
 * can no longer unmap them.
 */
#define MAX_WATCHED 512

struct watched_slot {
    void **slot;
    void *wrapper;
    void *before;    /* the slot's value just before it was patched */
    void *bound[2];  /* unresolved (lazy) when patched: what the binder can
                      * resolve it to (global scope, the object's own scope);
                      * NULL where unknown */
    int closes;
};

static struct watched_slot watched[MAX_WATCHED];
static unsigned int nwatched;

/*
 * Puts the wrapper back into every watched slot the lazy binder overwrote.
 * The binder writes either the value the slot had (a second thread resolving
 * the same first call), or, into a slot that was unresolved when it was
 * patched, the definition its first resolution finds (`bound`, looked up at
 * install); any other value is someone else's hook, left alone as if it had
 * been installed over ours.  Returns 1 if a close()
 * slot was repaired: close() calls may have bypassed the wrapper, their
 * numbers may still be in the table, and the table must be forgotten.
 * Plain loads and stores to pages that are writable: async-signal-safe.
 */
static int repair_slots(void)
{
    int lost_close = 0;
    unsigned int n = __atomic_load_n(&nwatched, __ATOMIC_ACQUIRE);
    for (unsigned int i = 0; i < n; i++) {
        const struct watched_slot *w = &watched[i];
        void *now = __atomic_load_n(w->slot, __ATOMIC_SEQ_CST);
        if (now != w->wrapper &&
            (now == w->before || (now != NULL && (now == w->bound[0] || now == w->bound[1])))) {
            __atomic_store_n(w->slot, w->wrapper, __ATOMIC_SEQ_CST);
            lost_close |= w->closes;
        }
    }
    return lost_close;
}

/*
 * Install time, under install_lock: watches the writable ones of n patched
 * slots of the symbols names[], whose values before the patch were before[].
 * For a slot that was unresolved (pointing into the object's own PLT), it
 * looks up what the binder's first resolution can store: the definition in
 * the global scope (an ordinary object's first choice) and in the object's own
 * scope, its dependency tree (first for an RTLD_DEEPBIND object, and the
 * fallback for one whose definition is not global).  dlsym() gives what the
 * binder gives (an IFUNC's chosen function, a preloaded interposer), so the
 * handlers only compare pointers.  dlsym() finds the default version of a
 * symbol; a lookup that fails (or an object bound to another version) leaves
 * a value the binder's write is not compared with: it would be taken for a
 * foreign hook, and the descriptors of that moment could leak into children,
 * as with any hook over ours.
 */
static void watch_slots(const zmqfork__elf *elf, void **const *slots, void *const *values,
                        void *const *before, const char *const *names, size_t n, int closes)
{
    const char *label = zmqfork__elf_name(elf);
    void *scope = NULL; /* the object's own handle, opened at its first lazy slot */
    int scope_tried = 0;
    unsigned int at = nwatched;
    for (size_t i = 0; i < n && at < MAX_WATCHED; i++) {
        if (!zmqfork__elf_slot_writable(elf, slots[i]))
            continue;
        struct watched_slot *w = &watched[at];
        w->slot = slots[i];
        w->wrapper = values[i];
        w->before = before[i];
        w->bound[0] = w->bound[1] = NULL;
        w->closes = closes;
        if (zmqfork__elf_owns(elf, before[i])) {
            if (!scope_tried) {
                scope_tried = 1;
                /* "" is the main program: its scope is the global one. */
                scope = dlopen(label[0] != '\0' ? label : NULL, RTLD_LAZY | RTLD_NOLOAD);
            }
            w->bound[0] = dlsym(RTLD_DEFAULT, names[i]);
            if (scope != NULL)
                w->bound[1] = dlsym(scope, names[i]);
        }
        at++;
    }
    if (scope != NULL)
        dlclose(scope); /* drops this reference only */
    __atomic_store_n(&nwatched, at, __ATOMIC_RELEASE);
}

/* How many of n slots watch_slots() would take. */
static size_t count_writable(const zmqfork__elf *elf, void **const *slots, size_t n)
{
    size_t count = 0;
    for (size_t i = 0; i < n; i++)
        count += (size_t)zmqfork__elf_slot_writable(elf, slots[i]);
    return count;
}

/* ---- the gate --------------------------------------------------------- */

/*
 * The gate word: the calls inside it in the low 32 bits, the gate's epoch in
 * the high 32 bits.  A child's cleanup empties the count and starts a new
 * epoch in one store; a call that entered in an older epoch (the forking
 * thread's own, interrupted by the signal handler that forked) leaves without
 * touching the count.  A call learns its epoch from the value its own atomic
 * increment returned, so wherever the fork interrupted it, the child's copy of
 * the call knows whether its increment is in the count it sees.
 */
static union {
    uint64_t word;
    unsigned int half[2]; /* futex word: the half holding the count */
} gate;
#define GATE_COUNT(word) ((unsigned int)((word) & 0xffffffffu))
#define GATE_EPOCH(word) ((unsigned int)((word) >> 32))
#define GATE_COUNT_HALF (__BYTE_ORDER__ == __ORDER_BIG_ENDIAN__)

/*
 * Hooked calls this thread is inside, counted before its increment of the
 * gate and after its decrement, so never fewer than it contributes to the
 * count.  A fork from a signal handler that interrupted such a call waits for
 * the others only.  With glibc, initial-exec: a plain thread-pointer-relative
 * access, no __tls_get_addr (which may allocate on a thread's first access),
 * so it is async-signal-safe; it takes 4 bytes of the static TLS surplus
 * glibc keeps for dlopen'd modules (if that were used up, the import would
 * fail).  Other C libraries keep the default model: musl refuses
 * initial-exec TLS in a dlopen'd object, and allocates a dlopen'd module's
 * TLS for every thread at dlopen, so its __tls_get_addr never allocates.
 */
#ifdef __GLIBC__
#define GATE_DEPTH_TLS_MODEL __attribute__((tls_model("initial-exec")))
#else
#define GATE_DEPTH_TLS_MODEL
#endif
static __thread unsigned int gate_depth GATE_DEPTH_TLS_MODEL;

static unsigned int pending;
static volatile uint64_t *token_ptr; /* zmqfork_token(), set at install */
static uint64_t table_token;          /* token under which the table is right */

static void futex_wait(unsigned int *word, unsigned int value)
{
    (void)syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, value, NULL, NULL, 0);
}

static void futex_wake_all(unsigned int *word)
{
    (void)syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

/* A fork without handlers happened: clean up (once) and wait for it. */
static __attribute__((noinline, cold)) void catch_up(void)
{
    int saved = errno;
    uint64_t current = zmqfork_refresh();
    while (__atomic_load_n(&table_token, __ATOMIC_ACQUIRE) != current)
        sched_yield();
    errno = saved;
}

/*
 * Waits until no fork is pending, or until this process turns out to be a
 * child of a fork that skipped the handlers (the token no longer matches the
 * table): a _Fork() from a signal handler that interrupted this very wait
 * leaves the child with `pending` raised and no parent handler to lower it;
 * enter() then catches up, and the cleanup resets the gate.  So the wait is
 * timed, and the token looked at after each wake.
 */
static __attribute__((noinline, cold)) void wait_for_fork(void)
{
    int saved = errno;
    unsigned int seen;
    while ((seen = __atomic_load_n(&pending, __ATOMIC_SEQ_CST)) != 0 &&
           *token_ptr == __atomic_load_n(&table_token, __ATOMIC_ACQUIRE)) {
        struct timespec slice = {.tv_sec = 0, .tv_nsec = 20 * 1000 * 1000};
        (void)syscall(SYS_futex, &pending, FUTEX_WAIT_PRIVATE, seen, &slice, NULL, 0);
    }
    errno = saved;
}

static __attribute__((noinline, cold)) void wake_preparer(void)
{
    int saved = errno;
    futex_wake_all(&gate.half[GATE_COUNT_HALF]);
    errno = saved;
}

static inline void leave(unsigned int epoch)
{
    uint64_t seen = __atomic_load_n(&gate.word, __ATOMIC_SEQ_CST);
    while (GATE_EPOCH(seen) == epoch &&
           !__atomic_compare_exchange_n(&gate.word, &seen, seen - 1, 1, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST)) {
    }
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    gate_depth--;
    /* A preparer may wait for a count other than zero (its own calls). */
    if (__builtin_expect(__atomic_load_n(&pending, __ATOMIC_SEQ_CST) != 0, 0))
        wake_preparer();
}

/* Returns the epoch to hand to leave(). */
static inline unsigned int enter(void)
{
    for (;;) {
        if (__builtin_expect(*token_ptr != __atomic_load_n(&table_token, __ATOMIC_ACQUIRE), 0))
            catch_up();
        gate_depth++;
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        unsigned int epoch = GATE_EPOCH(__atomic_fetch_add(&gate.word, 1, __ATOMIC_SEQ_CST));
        if (__builtin_expect(__atomic_load_n(&pending, __ATOMIC_SEQ_CST) == 0, 1))
            return epoch;
        leave(epoch);
        wait_for_fork();
    }
}

/* ---- testing: widen the race windows ------------------------------------ */

static unsigned int testing_delay_us; /* 0 in production: one load, one branch */
static unsigned int testing_in_window;

/* Sleeps inside the gate, between the real call and the table update. */
static __attribute__((noinline, cold)) void testing_pause(void)
{
    int saved = errno;
    struct timespec pause = {
        .tv_sec = testing_delay_us / 1000000u,
        .tv_nsec = (long)(testing_delay_us % 1000000u) * 1000,
    };
    __atomic_add_fetch(&testing_in_window, 1, __ATOMIC_SEQ_CST);
    while (nanosleep(&pause, &pause) != 0 && errno == EINTR) {
    }
    __atomic_sub_fetch(&testing_in_window, 1, __ATOMIC_SEQ_CST);
    errno = saved;
}

#define TESTING_WINDOW()                                                                    \
    do {                                                                                    \
        if (__builtin_expect(__atomic_load_n(&testing_delay_us, __ATOMIC_RELAXED) != 0, 0))  \
            testing_pause();                                                                \
    } while (0)

/* ---- the wrappers: the real call and the table update, inside the gate ---- */

/* The body of a wrapper whose call returns one new descriptor or -1. */
#define CREATE(call)                                                                        \
    unsigned int epoch_ = enter();                                                          \
    int fd_ = (call);                                                                       \
    TESTING_WINDOW();                                                                       \
    track(fd_);                                                                             \
    leave(epoch_);                                                                          \
    return fd_

static int hook_socket(int domain, int type, int protocol)
{
    CREATE(socket(domain, type, protocol));
}

static int hook_accept(int fd, struct sockaddr *addr, socklen_t *len)
{
    CREATE(accept(fd, addr, len));
}

static int hook_accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
    CREATE(accept4(fd, addr, len, flags));
}

static int hook_eventfd(unsigned int initval, int flags)
{
    CREATE(eventfd(initval, flags));
}

static int hook_epoll_create1(int flags)
{
    CREATE(epoll_create1(flags));
}

static int hook_epoll_create(int size)
{
    CREATE(epoll_create(size));
}

static int hook_dup(int fd)
{
    CREATE(dup(fd));
}

/* open's mode is read only when the flags say it was passed. */
static mode_t open_mode(int flags, va_list ap)
{
    if ((flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE)
        return (mode_t)va_arg(ap, int);
    return 0;
}

static int hook_open(const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = open_mode(flags, ap);
    va_end(ap);
    CREATE(open(path, flags, mode));
}

#ifdef __GLIBC__
/* glibc's _FORTIFY_SOURCE entry points, which an object may import instead. */
extern int __open_2(const char *path, int flags);
extern int __open64_2(const char *path, int flags);

static int hook_open64(const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = open_mode(flags, ap);
    va_end(ap);
    CREATE(open64(path, flags, mode));
}

static int hook_open_2(const char *path, int flags)
{
    CREATE(__open_2(path, flags));
}

static int hook_open64_2(const char *path, int flags)
{
    CREATE(__open64_2(path, flags));
}
#endif

static int hook_pair(int rc, const int fds[2])
{
    if (rc == 0) {
        track(fds[0]);
        track(fds[1]);
    }
    return rc;
}

static int hook_socketpair(int domain, int type, int protocol, int fds[2])
{
    unsigned int epoch = enter();
    int rc = hook_pair(socketpair(domain, type, protocol, fds), fds);
    leave(epoch);
    return rc;
}

static int hook_pipe(int fds[2])
{
    unsigned int epoch = enter();
    int rc = hook_pair(pipe(fds), fds);
    leave(epoch);
    return rc;
}

static int hook_pipe2(int fds[2], int flags)
{
    unsigned int epoch = enter();
    int rc = hook_pair(pipe2(fds, flags), fds);
    leave(epoch);
    return rc;
}

/* dup2/dup3 onto a number makes that number libzmq's; dup2(fd, fd) changes nothing. */
static int hook_dup2(int fd, int target)
{
    unsigned int epoch = enter();
    int rc = dup2(fd, target);
    if (rc >= 0 && fd != target)
        track(rc);
    leave(epoch);
    return rc;
}

static int hook_dup3(int fd, int target, int flags)
{
    unsigned int epoch = enter();
    int rc = dup3(fd, target, flags);
    track(rc);
    leave(epoch);
    return rc;
}

static int hook_close(int fd)
{
    unsigned int epoch = enter();
    untrack(fd); /* before the real close: the number may be reused at once */
    TESTING_WINDOW();
    int rc = close(fd);
    leave(epoch);
    return rc;
}

struct hook {
    const char *name;
    void *wrapper;
    int closes; /* 1 for close: without it the table would go stale */
};

/* close comes first: the slots are patched in this order, and a descriptor
 * tracked while close was still unpatched could be closed untracked, leaving
 * a stale number a child would later close for someone else. */
static const struct hook hooks[] = {
    {"close", (void *)hook_close, 1},
    {"socket", (void *)hook_socket, 0},
    {"accept", (void *)hook_accept, 0},
    {"accept4", (void *)hook_accept4, 0},
    {"eventfd", (void *)hook_eventfd, 0},
    {"epoll_create1", (void *)hook_epoll_create1, 0},
    {"epoll_create", (void *)hook_epoll_create, 0},
    {"socketpair", (void *)hook_socketpair, 0},
    {"pipe", (void *)hook_pipe, 0},
    {"pipe2", (void *)hook_pipe2, 0},
    {"dup", (void *)hook_dup, 0},
    {"dup2", (void *)hook_dup2, 0},
    {"dup3", (void *)hook_dup3, 0},
    {"open", (void *)hook_open, 0},
#ifdef __GLIBC__
    {"open64", (void *)hook_open64, 0},
    {"__open_2", (void *)hook_open_2, 0},
    {"__open64_2", (void *)hook_open64_2, 0},
#endif
};
#define NHOOKS (sizeof hooks / sizeof hooks[0])
#define MAX_SLOTS_PER_HOOK 8

/* ---- the fork handlers' part -------------------------------------------- */

void zmqfork__fdtrack_prepare(void)
{
    int saved = errno;
    __atomic_add_fetch(&pending, 1, __ATOMIC_SEQ_CST);
    /* Wait for every call inside the gate but this thread's own: a fork from
     * a signal handler that interrupted one cannot wait for it. */
    unsigned int own = gate_depth, seen;
    while ((seen = GATE_COUNT(__atomic_load_n(&gate.word, __ATOMIC_SEQ_CST))) > own)
        futex_wait(&gate.half[GATE_COUNT_HALF], seen);
    /* Repair here too, not only in the child, so the parent stops losing
     * descriptors to the plain functions. */
    if (repair_slots())
        forget_table();
    errno = saved;
}

void zmqfork__fdtrack_parent(void)
{
    int saved = errno;
    if (__atomic_sub_fetch(&pending, 1, __ATOMIC_SEQ_CST) == 0)
        futex_wake_all(&pending);
    errno = saved;
}

void zmqfork__fdtrack_child(void)
{
    int saved = errno;
    /* No other thread of this process is inside the gate (see the top); calls
     * of this thread that a signal handler interrupted to fork will leave in
     * the old epoch, without touching the new count. */
    uint64_t old_gate = __atomic_load_n(&gate.word, __ATOMIC_SEQ_CST);
    __atomic_store_n(&gate.word, (uint64_t)(GATE_EPOCH(old_gate) + 1u) << 32, __ATOMIC_SEQ_CST);
    __atomic_store_n(&pending, 0, __ATOMIC_SEQ_CST);
    uint64_t *map = __atomic_load_n(&bitmap, __ATOMIC_ACQUIRE);
    if (map != NULL) {
        /* The child's copy of the slots tells whether the loader overwrote a
         * close() slot at any time up to the fork (only repair_slots() puts a
         * wrapper back, and it forgets the table when it does): if so, a
         * number in the table may have been closed and reused, and closing
         * it here could hit a descriptor that is not libzmq's. */
        if (repair_slots())
            forget_table();
        long closed = 0;
        unsigned int words = (__atomic_load_n(&high, __ATOMIC_RELAXED) + 63) / 64;
        for (unsigned int w = 0; w < words; w++) {
            uint64_t bits = map[w];
            if (bits == 0)
                continue;
            map[w] = 0;
            while (bits != 0) {
                int fd = (int)(w * 64 + (unsigned int)__builtin_ctzll(bits));
                bits &= bits - 1;
                (void)close(fd); /* close only: the description is shared */
                closed++;
            }
        }
        for (int i = 0; i < OVERFLOW_SLOTS; i++) {
            if (overflow[i] >= 0) {
                (void)close(overflow[i]);
                overflow[i] = -1;
                closed++;
            }
        }
        __atomic_store_n(&tracked_now, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&closed_last, closed, __ATOMIC_RELAXED);
        __atomic_add_fetch(&closed_total, closed, __ATOMIC_RELAXED);
        /* Publish "the table is right for this token" last. */
        __atomic_store_n(&table_token, *token_ptr, __ATOMIC_RELEASE);
    }
    errno = saved;
}

/* ---- install ------------------------------------------------------------ */

/*
 * Patches every hooked function the object `elf` imports and writes the names
 * patched into names[].  Two batches, each all or nothing: close() first,
 * then the creating calls.  If the second batch fails, close() stays hooked:
 * a creating wrapper may already have tracked a descriptor (another thread of
 * the object, or one still inside a wrapper it jumped to before the rollback),
 * and only the close() wrapper takes it out of the table when it is closed;
 * with the plain close() back, its number would stay in the table and a child
 * would close whatever later got that number.  Returns ZMQFORK_FDTRACK_ON or
 * fills *why and returns its code.
 */
static int hook_elf(zmqfork__elf *elf, char *names, size_t names_size, struct failure *why)
{
    void **slots[NHOOKS * MAX_SLOTS_PER_HOOK];
    void *values[NHOOKS * MAX_SLOTS_PER_HOOK];
    void *before[NHOOKS * MAX_SLOTS_PER_HOOK];
    const char *symbols[NHOOKS * MAX_SLOTS_PER_HOOK]; /* the symbol of each slot */
    size_t total = 0, used = 0, closers = 0;
    int creators = 0;
    const char *label = zmqfork__elf_name(elf);

    names[0] = '\0';
    for (size_t h = 0; h < NHOOKS; h++) { /* hooks[] lists close first */
        size_t found = 0;
        int rc = zmqfork__elf_find(elf, hooks[h].name, &slots[total], MAX_SLOTS_PER_HOOK, &found);
        if (rc != ZMQFORK__ELF_OK)
            return fail(why, ZMQFORK_FDTRACK_EOBJECT, "cannot read the GOT of %s: %s", label,
                        zmqfork__elf_strerror(rc));
        if (found == 0)
            continue;
        for (size_t k = 0; k < found; k++) {
            values[total + k] = hooks[h].wrapper;
            symbols[total + k] = hooks[h].name;
        }
        total += found;
        if (hooks[h].closes)
            closers = total;
        else
            creators = 1;
        if (used < names_size) {
            int n = snprintf(names + used, names_size - used, "%s%s", used ? "," : "",
                             hooks[h].name);
            used += n > 0 ? (size_t)n : 0;
        }
    }
    if (!creators)
        return fail(why, ZMQFORK_FDTRACK_ENOIMPORTS,
                    "%s imports none of the descriptor calls zmqfork tracks", label);
    if (closers == 0)
        return fail(why, ZMQFORK_FDTRACK_ENOIMPORTS,
                    "%s makes descriptors but does not import close(): the table would go stale",
                    label);
    if (__atomic_load_n(&bitmap, __ATOMIC_ACQUIRE) == NULL) {
        int err = table_init();
        if (err != 0)
            return fail(why, ZMQFORK_FDTRACK_ENOMEM, "cannot map the descriptor table: %s",
                        strerror(err));
    }
    /* The fork handlers store to watched slots: the object must never be unmapped. */
    if (label[0] != '\0') { /* "" is the main program, never unloaded */
        dlerror();
        void *pin = dlopen(label, RTLD_LAZY | RTLD_NOLOAD | RTLD_NODELETE);
        if (pin == NULL) {
            const char *err = dlerror();
            return fail(why, ZMQFORK_FDTRACK_EOBJECT, "cannot keep %s loaded (%s)", label,
                        err ? err : "dlopen failed");
        }
        dlclose(pin); /* drops this reference only: RTLD_NODELETE stays */
    }
    if (nwatched + count_writable(elf, slots, total) > MAX_WATCHED)
        return fail(why, ZMQFORK_FDTRACK_ENOMEM,
                    "too many writable GOT slots in %s to watch for the lazy binder", label);
    for (size_t i = 0; i < total; i++)
        before[i] = __atomic_load_n(slots[i], __ATOMIC_SEQ_CST);
    int rc = zmqfork__elf_replace(elf, slots, values, closers);
    if (rc != ZMQFORK__ELF_OK)
        return fail(why, ZMQFORK_FDTRACK_EPATCH, "cannot patch the GOT of %s: %s", label,
                    zmqfork__elf_strerror(rc));
    watch_slots(elf, slots, values, before, symbols, closers, 1);
    rc = zmqfork__elf_replace(elf, slots + closers, values + closers, total - closers);
    if (rc != ZMQFORK__ELF_OK)
        return fail(why, ZMQFORK_FDTRACK_EPATCH,
                    "cannot patch the GOT of %s: %s (close() stays hooked, so that descriptors "
                    "tracked before the failure leave the table when closed)",
                    label, zmqfork__elf_strerror(rc));
    watch_slots(elf, slots + closers, values + closers, before + closers, symbols + closers,
                total - closers, 0);
    return ZMQFORK_FDTRACK_ON;
}

/*
 * Opens the loaded object containing addr and hooks it; on success copies its
 * name into name[].  Returns ZMQFORK_FDTRACK_ON or fills *why.
 */
static int hook_object_at(const void *addr, char *names, size_t names_size, char *name,
                          size_t name_size, struct failure *why)
{
    zmqfork__elf *elf = NULL;
    int rc = zmqfork__elf_open(addr, &elf);
    if (rc != ZMQFORK__ELF_OK)
        return fail(why, rc == ZMQFORK__ELF_EARCH ? ZMQFORK_FDTRACK_EARCH : ZMQFORK_FDTRACK_EOBJECT,
                    "cannot read the object defining libzmq: %s", zmqfork__elf_strerror(rc));
    rc = hook_elf(elf, names, names_size, why);
    if (rc == ZMQFORK_FDTRACK_ON)
        snprintf(name, name_size, "%s", zmqfork__elf_name(elf));
    zmqfork__elf_close(elf);
    return rc;
}

/* token_ptr and table_token must be right before the first slot is patched. */
static void prepare_gate(void)
{
    if (token_ptr == NULL) {
        token_ptr = zmqfork_token();
        /* refresh(), not *token_ptr: after a raw fork the token still reads 0. */
        __atomic_store_n(&table_token, zmqfork_refresh(), __ATOMIC_RELEASE);
    }
}

/*
 * Where libzmq lives, seen from the loaded object at `path`: the object that
 * defines zmq_ctx_new in its dependency tree (pyzmq.libs/libzmq-<hash>.so,
 * the system libzmq.so.5, or the backend itself when libzmq is linked in), or
 * the backend itself when zmq_ctx_new is not exported (static link with hidden
 * symbols).  Stores an address inside that object.  Returns ZMQFORK_FDTRACK_ON
 * or fills *why.
 */
static int locate_libzmq(const char *path, const void **addr, struct failure *why)
{
    *addr = NULL;
    dlerror();
    void *handle = dlopen(path, RTLD_NOLOAD | RTLD_LAZY);
    if (handle == NULL) {
        const char *err = dlerror();
        return fail(why, ZMQFORK_FDTRACK_ENOBACKEND, "the pyzmq backend %s is not loaded (%s)",
                    path, err ? err : "dlopen failed");
    }
    int rc = ZMQFORK_FDTRACK_ON;
    void *symbol = dlsym(handle, "zmq_ctx_new");
    struct link_map *map = NULL;
    if (symbol != NULL) {
        *addr = symbol;
    } else if (dlinfo(handle, RTLD_DI_LINKMAP, &map) == 0 && map != NULL) {
        *addr = map->l_ld; /* inside the backend: its own dynamic section */
    } else {
        const char *err = dlerror();
        rc = fail(why, ZMQFORK_FDTRACK_EOBJECT, "cannot inspect the pyzmq backend %s (%s)", path,
                  err ? err : "dlinfo failed");
    }
    dlclose(handle); /* drops the reference RTLD_NOLOAD took; pyzmq holds its own */
    return rc;
}

int zmqfork_fdtrack_install(const char *backend_path)
{
    struct failure why = {ZMQFORK_FDTRACK_ON, "on"};
    static char names[sizeof functions];
    static char name[sizeof object_name];
    const void *addr = NULL;

    pthread_mutex_lock(&install_lock);
    int result = __atomic_load_n(&status, __ATOMIC_ACQUIRE);
    if (result != ZMQFORK_FDTRACK_ENOTINSTALLED) {
        pthread_mutex_unlock(&install_lock);
        return result;
    }
    if (zmqfork_token() == NULL)
        fail(&why, ZMQFORK_FDTRACK_EOBJECT, "zmqfork_init() has not run");
    else if (backend_path == NULL || backend_path[0] == '\0')
        fail(&why, ZMQFORK_FDTRACK_ENOBACKEND, "no pyzmq backend path was given");
    else if (locate_libzmq(backend_path, &addr, &why) == ZMQFORK_FDTRACK_ON) {
        prepare_gate();
        hook_object_at(addr, names, sizeof names, name, sizeof name, &why);
    }
    /* Publish the outcome: texts first, the status last. */
    memcpy(reason, why.message, sizeof reason);
    if (why.code == ZMQFORK_FDTRACK_ON) {
        memcpy(functions, names, sizeof functions);
        memcpy(object_name, name, sizeof object_name);
    }
    __atomic_store_n(&status, why.code, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&install_lock);
    return why.code;
}

int zmqfork_testing_fdtrack_hook_object(const char *path)
{
    struct failure why = {ZMQFORK_FDTRACK_ON, ""};
    char names[sizeof functions];
    char name[sizeof object_name];
    struct link_map *map = NULL;

    pthread_mutex_lock(&install_lock);
    void *handle = dlopen(path, RTLD_NOLOAD | RTLD_LAZY);
    if (zmqfork_token() == NULL)
        why.code = ZMQFORK_FDTRACK_EOBJECT;
    else if (handle == NULL)
        why.code = ZMQFORK_FDTRACK_ENOBACKEND;
    else if (dlinfo(handle, RTLD_DI_LINKMAP, &map) != 0 || map == NULL)
        why.code = ZMQFORK_FDTRACK_EOBJECT;
    else {
        prepare_gate();
        hook_object_at(map->l_ld, names, sizeof names, name, sizeof name, &why);
    }
    if (handle != NULL)
        dlclose(handle);
    pthread_mutex_unlock(&install_lock);
    return why.code;
}

long zmqfork_fdtrack_tracked(void)
{
    return __atomic_load_n(&tracked_now, __ATOMIC_RELAXED);
}

void zmqfork_testing_fdtrack_delay(unsigned int microseconds)
{
    __atomic_store_n(&testing_delay_us, microseconds, __ATOMIC_RELAXED);
}

unsigned int zmqfork_testing_fdtrack_in_window(void)
{
    return __atomic_load_n(&testing_in_window, __ATOMIC_SEQ_CST);
}

void zmqfork_testing_fdtrack_fail_patch(unsigned int after_slots, void (*before_failing)(void))
{
    pthread_mutex_lock(&install_lock);
    zmqfork__elf_testing_fail_after(after_slots, before_failing);
    pthread_mutex_unlock(&install_lock);
}

long zmqfork_fdtrack_closed_last(void)
{
    return __atomic_load_n(&closed_last, __ATOMIC_RELAXED);
}

long zmqfork_fdtrack_closed_total(void)
{
    return __atomic_load_n(&closed_total, __ATOMIC_RELAXED);
}

long zmqfork_fdtrack_untracked(void)
{
    return __atomic_load_n(&untracked, __ATOMIC_RELAXED);
}

int zmqfork_fdtrack_is_tracked(int fd)
{
    return is_tracked(fd);
}

int zmqfork_fdtrack_snapshot(int *fds, int max)
{
    int count = 0;
    uint64_t *map = __atomic_load_n(&bitmap, __ATOMIC_ACQUIRE);
    if (map == NULL)
        return 0;
    unsigned int limit = __atomic_load_n(&high, __ATOMIC_RELAXED);
    for (unsigned int fd = 0; fd < limit; fd++) {
        if (is_tracked((int)fd)) {
            if (count < max)
                fds[count] = (int)fd;
            count++;
        }
    }
    for (int i = 0; i < OVERFLOW_SLOTS; i++) {
        int fd = __atomic_load_n(&overflow[i], __ATOMIC_RELAXED);
        if (fd >= 0) {
            if (count < max)
                fds[count] = fd;
            count++;
        }
    }
    return count;
}

#else /* !__linux__ */

void zmqfork__fdtrack_prepare(void) {}
void zmqfork__fdtrack_parent(void) {}
void zmqfork__fdtrack_child(void) {}

int zmqfork_fdtrack_install(const char *backend_path)
{
    (void)backend_path;
    pthread_mutex_lock(&install_lock);
    snprintf(reason, sizeof reason, "descriptor tracking needs Linux (ELF GOT patching)");
    __atomic_store_n(&status, ZMQFORK_FDTRACK_ENOTLINUX, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&install_lock);
    return ZMQFORK_FDTRACK_ENOTLINUX;
}

int zmqfork_testing_fdtrack_hook_object(const char *path)
{
    (void)path;
    return ZMQFORK_FDTRACK_ENOTLINUX;
}

void zmqfork_testing_fdtrack_delay(unsigned int microseconds) { (void)microseconds; }
unsigned int zmqfork_testing_fdtrack_in_window(void) { return 0; }
void zmqfork_testing_fdtrack_fail_patch(unsigned int after_slots, void (*before_failing)(void))
{
    (void)after_slots, (void)before_failing;
}

long zmqfork_fdtrack_tracked(void) { return 0; }
long zmqfork_fdtrack_closed_last(void) { return 0; }
long zmqfork_fdtrack_closed_total(void) { return 0; }
long zmqfork_fdtrack_untracked(void) { return 0; }
int zmqfork_fdtrack_is_tracked(int fd) { (void)fd; return 0; }
int zmqfork_fdtrack_snapshot(int *fds, int max) { (void)fds, (void)max; return 0; }

#endif /* __linux__ */

int zmqfork_fdtrack_status(void)
{
    return __atomic_load_n(&status, __ATOMIC_ACQUIRE);
}

const char *zmqfork_fdtrack_reason(void)
{
    return reason;
}

const char *zmqfork_fdtrack_object(void)
{
    return zmqfork_fdtrack_status() == ZMQFORK_FDTRACK_ON ? object_name : "";
}

const char *zmqfork_fdtrack_functions(void)
{
    return zmqfork_fdtrack_status() == ZMQFORK_FDTRACK_ON ? functions : "";
}
