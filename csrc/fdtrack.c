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
 *   - A tracked number carries the print of its file (st_dev, st_ino),
 *     stored before its bit is set; the cleanup closes a number only if it
 *     still shows that print, and, when deferred, only if it is a socket or
 *     kcmp() against the parent confirms it (see identify() and zmqfork.h).
 *   - The real call and its table update happen inside the *gate*; the
 *     prepare handler closes the gate and waits (at most GATE_WAIT_NS) until
 *     no call of another thread is inside, so in the child the table says
 *     exactly which descriptors are libzmq's, but for the calls the wait gave
 *     up on, counted as untracked (see the signal-handler case below too).
 *     The ordering of create/track and untrack/close makes every such
 *     inexactness a leak, never a wrong close.
 *
 * The gate: the count in `gate` is the calls inside; `pending` counts forks
 *   between their prepare and parent handlers.  A call increments the count,
 *   then checks `pending`; if a fork is pending it backs out and sleeps on a
 *   futex until the parent handler reopens the gate, at most GATE_WAIT_NS
 *   (the forking thread's later prepare handlers may need what the waiting
 *   thread holds: with the GIL, a deadlock otherwise), then goes in.  Prepare
 *   increments `pending`, then sleeps until the count is zero (but see the
 *   signal-handler case below), at most GATE_WAIT_NS.  Both sides store, then
 *   load, with sequentially consistent atomics, so at least one sees the
 *   other.  Only atomics, futex and clock_gettime: async-signal-safe, no
 *   allocation, no locks a dead thread could hold.  An accept with no client
 *   pending (it would wait for one) runs outside the gate (counted in
 *   `outside`), its table update inside; a call that blocks inside (open of a
 *   FIFO, an accept whose client another process took) holds a fork back for
 *   the bound only.  A wrapper leaves the gate through a cleanup attribute,
 *   so a cancellation unwinding it (the module is built with -fexceptions)
 *   leaves the gate too.
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
 *   cleanup is published.  Without wipe-on-fork (pid mode) the token does not
 *   change; `table_token` is then kept at 0, so every call falls through to
 *   catch_up(), which compares getpid() with `table_pid`.  Either way no
 *   descriptor made in such a child is tracked before the inherited ones are
 *   cleaned up, and the cleanup can reset the gate: no thread of the child is
 *   inside it.  A hooked call that was in flight in the parent at the moment
 *   of such a fork can leave that one descriptor open in the child, counted
 *   as untracked.  The cleanup runs once per process (`claimed_pid`), so a
 *   refresh before the atfork child handler (from a signal handler in the
 *   child) is not followed by a second cleanup closing the child's own.
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
 *   of someone else's, left alone; on a close() slot (watched in RELRO pages
 *   too, where only another library can write) the table is forgotten all
 *   the same, since that hook may not chain to the wrapper.  Cost: libzmq's
 *   descriptors of that moment survive into children; creating calls made
 *   through an overwritten slot until the next fork are not tracked.
 *
 * The table: a bitmap indexed by descriptor number with a print per number,
 *   mmap'd once at install and sized by the hard RLIMIT_NOFILE (capped), plus
 *   a few overflow slots for numbers beyond it (one entry per number);
 *   numbers beyond both are counted as untracked.
 *
 * Publication: the wrappers are reached through GOT slots stored after the
 *   table, the tokens and the mode were set; `token_ptr` is stored last with
 *   release, and each wrapper loads it with acquire before reading the rest,
 *   so a CPU that reorders loads (aarch64) cannot see the slot's new value
 *   and the table's old state.
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
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* ---- the table -------------------------------------------------------- */

#define TABLE_MIN_BITS 4096u
#define TABLE_MAX_BITS (1u << 24) /* 2 MiB of bitmap and 256 MiB of prints, reserved, touched only where used */
#define OVERFLOW_SLOTS 64

/* What fstat() said about a tracked descriptor when it was tracked.  {0, 0}:
 * unknown (fstat failed, or a fork caught the entry half-written). */
struct print {
    uint64_t dev;
    uint64_t ino;
};

struct overflow_slot {
    int fd; /* -1: free */
    struct print print;
};

static uint64_t *bitmap;      /* NULL until install; then never changes */
static struct print *prints;  /* prints[fd], valid while fd's bit is set */
static unsigned int nbits;    /* bitmap size in descriptors, a multiple of 64 */
static unsigned int high;     /* one more than the highest number ever tracked */
static struct overflow_slot overflow[OVERFLOW_SLOTS];
/* Every eventfd and epoll descriptor shows the kernel's one anonymous inode:
 * its print, learned at install, spares those calls an fstat(). */
static struct print anon_print;
static int anon_known;
static long tracked_now;
static long closed_last;
static long closed_total;
static long untracked;

static void take_print(int fd, struct print *out)
{
    struct stat st;
    if (fstat(fd, &st) == 0) {
        out->dev = (uint64_t)st.st_dev;
        out->ino = (uint64_t)st.st_ino;
    } else {
        out->dev = out->ino = 0;
    }
}

static void store_print(struct print *to, const struct print *from)
{
    __atomic_store_n(&to->dev, from->dev, __ATOMIC_RELAXED);
    __atomic_store_n(&to->ino, from->ino, __ATOMIC_RELAXED);
}

static unsigned int testing_table_bits; /* 0: sized by the limit */

/* Maps the table and learns the anonymous inode's print; returns 0 or an errno value. */
static int table_init(void)
{
    struct rlimit limit;
    uint64_t want = TABLE_MIN_BITS;
    if (testing_table_bits != 0)
        want = testing_table_bits;
    else if (getrlimit(RLIMIT_NOFILE, &limit) != 0 || limit.rlim_max == RLIM_INFINITY ||
             limit.rlim_max > TABLE_MAX_BITS)
        want = TABLE_MAX_BITS;
    else if (limit.rlim_max > want)
        want = limit.rlim_max;
    want = (want + 63) & ~(uint64_t)63;
    size_t bytes = (size_t)(want / 8 + want * sizeof(struct print));
    void *map = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
    if (map == MAP_FAILED)
        return errno;
    for (int i = 0; i < OVERFLOW_SLOTS; i++)
        overflow[i].fd = -1;
    int probe = eventfd(0, EFD_CLOEXEC); /* the real eventfd: this object is not hooked */
    if (probe >= 0) {
        take_print(probe, &anon_print);
        anon_known = anon_print.ino != 0;
        (void)close(probe);
    }
    nbits = (unsigned int)want;
    prints = (struct print *)((char *)map + want / 8);
    __atomic_store_n(&bitmap, (uint64_t *)map, __ATOMIC_RELEASE);
    return 0;
}

/*
 * Records `fd` as libzmq's, with its print (`known`, or fstat's).  The print
 * is stored before the entry is visible, so a fork (a raw one, or one from a
 * signal handler) between the two steps leaves no entry, never one with a
 * print of something else.  Tracking a number already tracked (dup2/dup3
 * onto libzmq's own descriptor) replaces its print and adds no duplicate.
 */
static void track(int fd, const struct print *known)
{
    if (fd < 0)
        return;
    struct print print;
    if (known != NULL)
        print = *known;
    else
        take_print(fd, &print);
    if ((unsigned int)fd < nbits) {
        /* `high` first: a fork between the two steps (from a signal handler,
         * or a raw clone) must not leave a set bit the cleanup does not scan. */
        unsigned int seen = __atomic_load_n(&high, __ATOMIC_RELAXED);
        while ((unsigned int)fd >= seen &&
               !__atomic_compare_exchange_n(&high, &seen, (unsigned int)fd + 1, 1,
                                            __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
        }
        store_print(&prints[fd], &print);
        uint64_t bit = (uint64_t)1 << (fd & 63);
        uint64_t old = __atomic_fetch_or(&bitmap[fd >> 6], bit, __ATOMIC_SEQ_CST);
        if (!(old & bit))
            __atomic_add_fetch(&tracked_now, 1, __ATOMIC_RELAXED);
        return;
    }
    /* Overflow: a number already there only gets its new print. */
    for (int i = 0; i < OVERFLOW_SLOTS; i++) {
        if (__atomic_load_n(&overflow[i].fd, __ATOMIC_RELAXED) == fd) {
            store_print(&overflow[i].print, &(struct print){0, 0}); /* never a half-new print */
            __atomic_signal_fence(__ATOMIC_SEQ_CST);
            store_print(&overflow[i].print, &print);
            return;
        }
    }
    for (int i = 0; i < OVERFLOW_SLOTS; i++) {
        int expected = -1;
        /* A free slot's print is {0, 0} (untrack clears it), so a fork right
         * after the claim sees an unknown print, never a stale one. */
        if (__atomic_compare_exchange_n(&overflow[i].fd, &expected, fd, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_RELAXED)) {
            store_print(&overflow[i].print, &print);
            __atomic_add_fetch(&tracked_now, 1, __ATOMIC_RELAXED);
            return;
        }
    }
    __atomic_add_fetch(&untracked, 1, __ATOMIC_RELAXED);
}

static void untrack(int fd)
{
    if (fd < 0)
        return;
    if ((unsigned int)fd < nbits) {
        uint64_t bit = (uint64_t)1 << (fd & 63);
        uint64_t old = __atomic_fetch_and(&bitmap[fd >> 6], ~bit, __ATOMIC_SEQ_CST);
        if (old & bit)
            __atomic_sub_fetch(&tracked_now, 1, __ATOMIC_RELAXED);
        return;
    }
    for (int i = 0; i < OVERFLOW_SLOTS; i++) {
        if (__atomic_load_n(&overflow[i].fd, __ATOMIC_RELAXED) != fd)
            continue;
        store_print(&overflow[i].print, &(struct print){0, 0});
        int expected = fd;
        if (__atomic_compare_exchange_n(&overflow[i].fd, &expected, -1, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_RELAXED))
            __atomic_sub_fetch(&tracked_now, 1, __ATOMIC_RELAXED);
        return;
    }
}

static int is_tracked(int fd)
{
    if (fd < 0 || __atomic_load_n(&bitmap, __ATOMIC_ACQUIRE) == NULL)
        return 0;
    if ((unsigned int)fd < nbits)
        return (__atomic_load_n(&bitmap[fd >> 6], __ATOMIC_RELAXED) >> (fd & 63)) & 1;
    for (int i = 0; i < OVERFLOW_SLOTS; i++)
        if (__atomic_load_n(&overflow[i].fd, __ATOMIC_RELAXED) == fd)
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
        forgotten += __atomic_exchange_n(&overflow[i].fd, -1, __ATOMIC_RELAXED) >= 0;
    __atomic_sub_fetch(&tracked_now, forgotten, __ATOMIC_RELAXED);
    __atomic_add_fetch(&untracked, forgotten, __ATOMIC_RELAXED);
}

/* ---- identity: is this number still libzmq's? ------------------------------ */

#ifndef ZMQFORK_KCMP_FILE
#define ZMQFORK_KCMP_FILE 0 /* KCMP_FILE of <linux/kcmp.h>, the kernel ABI value */
#endif

/* The mark on eventfd and epoll descriptions libzmq made (see marked()). */
#define MARK_SIG 64
#ifndef F_SETSIG
#define F_SETSIG 10
#define F_GETSIG 11
#endif

enum identity {
    ID_GONE,    /* nothing open at that number: nothing to close */
    ID_OTHER,   /* another file: the number was taken over (closed and reused, dup2) */
    ID_OURS,    /* libzmq's open file description: close it */
    ID_UNKNOWN, /* cannot tell: keep it open (a leak), counted as untracked */
};

/* kcmp() against the parent for the rest of one cleanup: its pid, or 0 once it failed. */
struct asker {
    pid_t parent;
    pid_t self;
};

static enum identity identify(int fd, const struct print *recorded, int deferred, struct asker *kcmp)
{
    struct stat st;
    if (fstat(fd, &st) != 0)
        return errno == EBADF ? ID_GONE : ID_UNKNOWN;
    if (recorded->dev == 0 && recorded->ino == 0)
        return ID_UNKNOWN;
    if ((uint64_t)st.st_dev != recorded->dev || (uint64_t)st.st_ino != recorded->ino)
        return ID_OTHER;
    /* At a fork that ran the handlers the table is exact, so a matching print
     * can only be libzmq's own file (see the top).  A socket's inode belongs
     * to exactly one open file description, so its print is its identity. */
    if (!deferred || S_ISSOCK(st.st_mode))
        return ID_OURS;
#ifdef SYS_kcmp
    if (kcmp->parent > 0) {
        long same = syscall(SYS_kcmp, (long)kcmp->parent, (long)kcmp->self, (long)ZMQFORK_KCMP_FILE,
                            (long)fd, (long)fd);
        if (same == 0)
            return ID_OURS;
        if (same < 0)
            kcmp->parent = 0; /* not permitted (seccomp, ptrace rules) or not built: stop asking */
    }
#else
    (void)kcmp;
#endif
    /* Not the parent's file at that number now (or no parent to ask): an
     * eventfd or epoll description libzmq made carries its mark; the child's
     * own do not. */
    if (fcntl(fd, F_GETSIG) == MARK_SIG)
        return ID_OURS;
    return ID_UNKNOWN;
}

/* ---- patched slots the loader may write again ---------------------------- */

/*
 * Every patched close() slot, and every other patched slot in a writable
 * page.  In a writable page, a lazy JUMP_SLOT resolution that was in flight at
 * install (the slot read before the patch, the resolver's store after it)
 * writes the plain function over the wrapper, and nothing can wait for it
 * (glibc's _dl_fixup stores without a lock).  A close() slot is watched in a
 * RELRO page too: another library may make it writable and put its own hook
 * there.  Entries are appended under install_lock, after their slots were
 * patched for good, and published by the release store of `nwatched`.  The
 * handlers read these slots, so a hooked object is made RTLD_NODELETE at
 * install: a dlclose() can no longer unmap them.
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
    int writable;    /* outside RELRO: the only slots the handlers store to */
};

static struct watched_slot watched[MAX_WATCHED];
static unsigned int nwatched;

/*
 * Puts the wrapper back into every writable watched slot the lazy binder
 * overwrote.  The binder writes either the value the slot had (a second
 * thread resolving the same first call), or, into a slot that was unresolved
 * when it was patched, the definition its first resolution finds (`bound`,
 * looked up at install); any other value is someone else's hook, left alone
 * as if it had been installed over ours.  Returns 1 if any close() slot held
 * anything but the wrapper (repaired or not, RELRO or not): close() calls may
 * have bypassed the wrapper, their numbers may still be in the table, and the
 * table must be forgotten.  Plain loads, and stores to writable pages only:
 * async-signal-safe.
 */
static int repair_slots(void)
{
    int lost_close = 0;
    unsigned int n = __atomic_load_n(&nwatched, __ATOMIC_ACQUIRE);
    for (unsigned int i = 0; i < n; i++) {
        const struct watched_slot *w = &watched[i];
        void *now = __atomic_load_n(w->slot, __ATOMIC_SEQ_CST);
        if (now == w->wrapper)
            continue;
        lost_close |= w->closes;
        if (w->writable &&
            (now == w->before || (now != NULL && (now == w->bound[0] || now == w->bound[1]))))
            __atomic_store_n(w->slot, w->wrapper, __ATOMIC_SEQ_CST);
    }
    return lost_close;
}

/*
 * Install time, under install_lock: watches n patched slots of the symbols
 * names[] (every one for close(), closes = 1; the writable ones otherwise),
 * whose values before the patch were before[].  For a writable slot that was
 * unresolved (pointing into the object's own PLT), it looks up what the
 * binder's first resolution can store: the definition in the global scope (an
 * ordinary object's first choice) and in the object's own scope, its
 * dependency tree (first for an RTLD_DEEPBIND object, and the fallback for one
 * whose definition is not global).  dlsym() gives what the binder gives (an
 * IFUNC's chosen function, a preloaded interposer), so the handlers only
 * compare pointers.  dlsym() finds the default version of a symbol; a lookup
 * that fails (or an object bound to another version) leaves a value the
 * binder's write is not compared with: it would be taken for a foreign hook
 * (left in place; on a close() slot the table is forgotten).
 */
static void watch_slots(const zmqfork__elf *elf, void **const *slots, void *const *values,
                        void *const *before, const char *const *names, size_t n, int closes)
{
    const char *label = zmqfork__elf_name(elf);
    void *scope = NULL; /* the object's own handle, opened at its first lazy slot */
    int scope_tried = 0;
    unsigned int at = nwatched;
    for (size_t i = 0; i < n && at < MAX_WATCHED; i++) {
        int writable = zmqfork__elf_slot_writable(elf, slots[i]);
        if (!writable && !closes)
            continue;
        struct watched_slot *w = &watched[at];
        w->slot = slots[i];
        w->wrapper = values[i];
        w->before = before[i];
        w->bound[0] = w->bound[1] = NULL;
        w->closes = closes;
        w->writable = writable;
        if (writable && zmqfork__elf_owns(elf, before[i])) {
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
static size_t count_watched(const zmqfork__elf *elf, void **const *slots, size_t n, int closes)
{
    size_t count = 0;
    for (size_t i = 0; i < n; i++)
        count += (size_t)(closes || zmqfork__elf_slot_writable(elf, slots[i]));
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

/* The longest a fork waits for calls inside the gate, and a call for a fork
 * to finish (zmqfork.h): 100 ms. */
#define GATE_WAIT_NS (100L * 1000 * 1000)

/*
 * Hooked calls this thread is inside, counted before its increment of the
 * gate and after its decrement, so never fewer than it contributes to the
 * count.  A fork from a signal handler that interrupted such a call waits for
 * the others only.  With glibc, initial-exec: a plain thread-pointer-relative
 * access, no __tls_get_addr (which may allocate on a thread's first access),
 * so it is async-signal-safe; it takes 8 bytes of the static TLS surplus
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
/* This thread's calls in flight outside the gate (see `outside`). */
static __thread unsigned int outside_depth GATE_DEPTH_TLS_MODEL;

/* Calls in flight outside the gate, of all threads: an accept on a blocking
 * listener, whose wait for a client no fork waits for.  A fork during one may
 * leave its new descriptor untracked in the child; the child counts them. */
static unsigned int outside;

static unsigned int pending;
/* zmqfork_token(); published (release) at install after everything the
 * wrappers read, and read with acquire by each of them: no wrapper, on any
 * CPU, sees the table or the tokens before they are set. */
static volatile uint64_t *token_ptr;
static uint64_t table_token; /* token under which the table is right; 0 in pid mode */
/*
 * Pid mode: wipe-on-fork is not in force, so a fork that skipped the handlers
 * leaves the token as it was.  The token then cannot tell a child, and every
 * hooked call compares getpid() with `table_pid` instead (table_token stays
 * 0, so the fast check always falls through to catch_up()).
 */
static int pid_mode;
static pid_t table_pid;   /* the process whose descriptors the table lists */
static pid_t claimed_pid; /* the process whose cleanup has started (once per process) */

static void futex_wait(unsigned int *word, unsigned int value, const struct timespec *timeout)
{
    (void)syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, value, timeout, NULL, 0);
}

static void futex_wake_all(unsigned int *word)
{
    (void)syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

static long monotonic_ns(void)
{
    struct timespec now;
    (void)clock_gettime(CLOCK_MONOTONIC, &now); /* async-signal-safe */
    return (long)now.tv_sec * 1000000000L + now.tv_nsec;
}

/* Nanoseconds left until `deadline` as a timespec; 0 when it has passed. */
static int time_left(long deadline, struct timespec *left)
{
    long ns = deadline - monotonic_ns();
    if (ns <= 0)
        return 0;
    left->tv_sec = ns / 1000000000L;
    left->tv_nsec = ns % 1000000000L;
    return 1;
}

/* Whether the table is this process's (slow: getpid() in pid mode). */
static int table_is_ours(void)
{
    if (pid_mode)
        return __atomic_load_n(&table_pid, __ATOMIC_ACQUIRE) == getpid();
    return *token_ptr == __atomic_load_n(&table_token, __ATOMIC_ACQUIRE);
}

static void cleanup(int deferred);

/*
 * A fork without handlers happened (or pid mode's check): clean up, once per
 * process, and wait until the cleanup is published.
 */
static __attribute__((noinline, cold)) void catch_up(void)
{
    int saved = errno;
    if (pid_mode) {
        pid_t self = getpid();
        if (__atomic_load_n(&table_pid, __ATOMIC_ACQUIRE) != self) {
            cleanup(1);
            while (__atomic_load_n(&table_pid, __ATOMIC_ACQUIRE) != self)
                sched_yield();
        }
    } else {
        uint64_t current = zmqfork_refresh(); /* its winner runs the cleanup */
        while (__atomic_load_n(&table_token, __ATOMIC_ACQUIRE) != current &&
               *token_ptr == current)
            sched_yield();
    }
    errno = saved;
}

/*
 * Waits until no fork is pending, at most GATE_WAIT_NS: the forking thread's
 * prepare handlers may need something this thread holds (the GIL, a lock of
 * another library whose handler runs after ours), so the wait gives way
 * rather than deadlock; the call then runs during the fork and the child
 * counts it as untracked.  Also stops when this process turns out to be a
 * child of a fork that skipped the handlers: a _Fork() from a signal handler
 * that interrupted this very wait leaves the child with `pending` raised and
 * no parent handler to lower it; enter() then catches up, and the cleanup
 * resets the gate.  So the wait is sliced, and the owner checked after each
 * wake.  Returns 0 when it gave way.
 */
static __attribute__((noinline, cold)) int wait_for_fork(void)
{
    int saved = errno, done = 1;
    unsigned int seen;
    long deadline = monotonic_ns() + GATE_WAIT_NS;
    while ((seen = __atomic_load_n(&pending, __ATOMIC_SEQ_CST)) != 0 && table_is_ours()) {
        struct timespec slice;
        if (!time_left(deadline, &slice)) {
            done = 0;
            break;
        }
        if (slice.tv_nsec > 20 * 1000 * 1000 || slice.tv_sec > 0)
            slice = (struct timespec){.tv_sec = 0, .tv_nsec = 20 * 1000 * 1000};
        futex_wait(&pending, seen, &slice);
    }
    errno = saved;
    return done;
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
        volatile uint64_t *token = __atomic_load_n(&token_ptr, __ATOMIC_ACQUIRE);
        if (__builtin_expect(*token != __atomic_load_n(&table_token, __ATOMIC_RELAXED), 0))
            catch_up();
        gate_depth++;
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        unsigned int epoch = GATE_EPOCH(__atomic_fetch_add(&gate.word, 1, __ATOMIC_SEQ_CST));
        if (__builtin_expect(__atomic_load_n(&pending, __ATOMIC_SEQ_CST) == 0, 1))
            return epoch;
        leave(epoch);
        if (!wait_for_fork()) {
            /* Gave way: go in while the fork is pending (see wait_for_fork). */
            gate_depth++;
            __atomic_signal_fence(__ATOMIC_SEQ_CST);
            return GATE_EPOCH(__atomic_fetch_add(&gate.word, 1, __ATOMIC_SEQ_CST));
        }
    }
}

/*
 * A wrapper's pass through the gate.  Declared with PASS, it leaves the gate
 * when the wrapper's scope ends, also when a cancellation (close, accept and
 * open are cancellation points) unwinds through it: the module is built with
 * -fexceptions, so the cleanup runs during the forced unwind too.  Left by
 * longjmp() from a signal handler, a pass stays counted: forks then wait the
 * bound, not forever.
 */
struct pass {
    unsigned int epoch;
    unsigned char inside;  /* counted in the gate */
    unsigned char outside; /* counted in `outside` */
};

static inline void pass_end(struct pass *pass)
{
    if (pass->inside) {
        pass->inside = 0;
        leave(pass->epoch);
    }
    if (pass->outside) {
        pass->outside = 0;
        __atomic_sub_fetch(&outside, 1, __ATOMIC_SEQ_CST);
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        outside_depth--;
    }
}

#define PASS struct pass pass_ __attribute__((cleanup(pass_end))) = {0, 0, 0}

static inline void pass_enter(struct pass *pass)
{
    pass->epoch = enter();
    pass->inside = 1;
}

/* For a call that may block: counted outside the gate while it runs. */
static inline void pass_outside(struct pass *pass)
{
    outside_depth++;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    __atomic_add_fetch(&outside, 1, __ATOMIC_SEQ_CST);
    pass->outside = 1;
}

/* ---- testing: widen the race windows ------------------------------------ */

static unsigned int testing_delay_us; /* 0 in production: one load, one branch */
static unsigned int testing_in_window;

static void testing_leave_window(unsigned int **count)
{
    __atomic_sub_fetch(*count, 1, __ATOMIC_SEQ_CST);
}

/* Sleeps inside the gate, between the real call and the table update. */
static __attribute__((noinline, cold)) void testing_pause(void)
{
    int saved = errno;
    struct timespec pause = {
        .tv_sec = testing_delay_us / 1000000u,
        .tv_nsec = (long)(testing_delay_us % 1000000u) * 1000,
    };
    __atomic_add_fetch(&testing_in_window, 1, __ATOMIC_SEQ_CST);
    /* Leaves the window count also when a cancellation unwinds the sleep. */
    unsigned int *in_window __attribute__((cleanup(testing_leave_window))) = &testing_in_window;
    while (nanosleep(&pause, &pause) != 0 && errno == EINTR) {
    }
    errno = saved;
}

#define TESTING_WINDOW()                                                                    \
    do {                                                                                    \
        if (__builtin_expect(__atomic_load_n(&testing_delay_us, __ATOMIC_RELAXED) != 0, 0))  \
            testing_pause();                                                                \
    } while (0)

/* ---- the wrappers: the real call and the table update, inside the gate ---- */

/* The body of a wrapper whose call returns one new descriptor or -1;
 * `known` is its print when the kind of descriptor fixes it, else NULL. */
#define CREATE(call, known)                                                                 \
    PASS;                                                                                   \
    pass_enter(&pass_);                                                                     \
    int fd_ = (call);                                                                       \
    TESTING_WINDOW();                                                                       \
    track(fd_, (known));                                                                    \
    return fd_

/* eventfd and epoll descriptors: the anonymous inode's print, when known. */
#define ANON_PRINT (anon_known ? &anon_print : NULL)

/*
 * Marks an eventfd or epoll descriptor libzmq made: F_SETSIG stores MARK_SIG
 * in its open file description, where every descriptor of it, in every
 * process, reads it back with F_GETSIG.  The signal would only be used for
 * O_ASYNC notification, which eventfd and epoll descriptors do not support.
 * A deferred cleanup that cannot ask the parent (gone, or kcmp refused) tells
 * libzmq's from the child's own by it: both show the one anonymous inode,
 * but only descriptions libzmq made carry the mark.  errno is kept.
 */
static int marked(int fd)
{
    if (fd >= 0) {
        int saved = errno;
        (void)fcntl(fd, F_SETSIG, MARK_SIG);
        errno = saved;
    }
    return fd;
}

static int hook_socket(int domain, int type, int protocol)
{
    CREATE(socket(domain, type, protocol), NULL);
}

/* 1 if an accept on `fd` would wait for a client: no connection is pending
 * (on a non-blocking listener it would fail with EAGAIN at once). */
static int no_client_pending(int fd)
{
    int saved = errno;
    struct pollfd listener = {.fd = fd, .events = POLLIN, .revents = 0};
    int ready = poll(&listener, 1, 0);
    errno = saved;
    return ready == 0;
}

/*
 * libzmq accepts when epoll says a client is pending, on a listener that is
 * blocking (its own, or one handed over with ZMQ_USE_FD): the accept returns
 * at once, inside the gate like the other calls.  But another process sharing
 * the listener (prefork workers, socket activation) may take that client
 * first, and the accept then waits for the next one, for as long as it takes.
 * So an accept with no client pending runs outside the gate, where no fork
 * waits for it, and only the table update goes in.  If the client is taken
 * between the check and the accept, the wait happens inside the gate, and a
 * fork meanwhile waits the bound.
 */
#define ACCEPT(call, listener)                                                              \
    PASS;                                                                                   \
    TESTING_WINDOW(); /* lets a test take the client first */                               \
    if (__builtin_expect(no_client_pending(listener), 0))                                   \
        pass_outside(&pass_);                                                               \
    else                                                                                    \
        pass_enter(&pass_);                                                                 \
    int fd_ = (call);                                                                       \
    if (pass_.outside)                                                                      \
        pass_enter(&pass_);                                                                 \
    TESTING_WINDOW();                                                                       \
    track(fd_, NULL);                                                                       \
    return fd_

static int hook_accept(int fd, struct sockaddr *addr, socklen_t *len)
{
    ACCEPT(accept(fd, addr, len), fd);
}

static int hook_accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
    ACCEPT(accept4(fd, addr, len, flags), fd);
}

static int hook_eventfd(unsigned int initval, int flags)
{
    CREATE(marked(eventfd(initval, flags)), ANON_PRINT);
}

static int hook_epoll_create1(int flags)
{
    CREATE(marked(epoll_create1(flags)), ANON_PRINT);
}

static int hook_epoll_create(int size)
{
    CREATE(marked(epoll_create(size)), ANON_PRINT);
}

static int hook_dup(int fd)
{
    CREATE(dup(fd), NULL);
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
    CREATE(open(path, flags, mode), NULL);
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
    CREATE(open64(path, flags, mode), NULL);
}

static int hook_open_2(const char *path, int flags)
{
    CREATE(__open_2(path, flags), NULL);
}

static int hook_open64_2(const char *path, int flags)
{
    CREATE(__open64_2(path, flags), NULL);
}
#endif

static int hook_pair(int rc, const int fds[2])
{
    if (rc == 0) {
        track(fds[0], NULL);
        track(fds[1], NULL);
    }
    return rc;
}

static int hook_socketpair(int domain, int type, int protocol, int fds[2])
{
    PASS;
    pass_enter(&pass_);
    return hook_pair(socketpair(domain, type, protocol, fds), fds);
}

static int hook_pipe(int fds[2])
{
    PASS;
    pass_enter(&pass_);
    return hook_pair(pipe(fds), fds);
}

static int hook_pipe2(int fds[2], int flags)
{
    PASS;
    pass_enter(&pass_);
    return hook_pair(pipe2(fds, flags), fds);
}

/* dup2/dup3 onto a number makes that number libzmq's; dup2(fd, fd) changes nothing. */
static int hook_dup2(int fd, int target)
{
    PASS;
    pass_enter(&pass_);
    int rc = dup2(fd, target);
    if (rc >= 0 && fd != target)
        track(rc, NULL);
    return rc;
}

static int hook_dup3(int fd, int target, int flags)
{
    PASS;
    pass_enter(&pass_);
    int rc = dup3(fd, target, flags);
    track(rc, NULL);
    return rc;
}

static int hook_close(int fd)
{
    PASS;
    pass_enter(&pass_);
    untrack(fd); /* before the real close: the number may be reused at once */
    TESTING_WINDOW();
    return close(fd);
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

/*
 * In a child made by a fork that ran the handlers, only the forking thread
 * exists: an install another thread was in at the fork holds install_lock
 * for nobody.  Copies a fresh mutex over it byte by byte (no libc call).
 */
static void reset_install_lock(void)
{
    static const pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    const volatile unsigned char *from = (const volatile unsigned char *)&fresh;
    volatile unsigned char *to = (volatile unsigned char *)&install_lock;
    for (size_t i = 0; i < sizeof install_lock; i++)
        to[i] = from[i];
}

void zmqfork__fdtrack_prepare(void)
{
    int saved = errno;
    if (__atomic_load_n(&token_ptr, __ATOMIC_ACQUIRE) == NULL) {
        errno = saved;
        return; /* not installed: nothing is hooked */
    }
    /* A process made by a fork that skipped the handlers, not caught up yet
     * (pid mode; with wipe-on-fork the forkdetect.c handler refreshed
     * first), inherited the gate as its parent's threads left it: catch up
     * first, or this would wait for calls no thread here will finish. */
    if (!table_is_ours())
        catch_up();
    __atomic_add_fetch(&pending, 1, __ATOMIC_SEQ_CST);
    /* Wait for every call inside the gate but this thread's own (a fork from
     * a signal handler that interrupted one cannot wait for it), at most
     * GATE_WAIT_NS: a call that does not come out (a blocking call,
     * a thread left by longjmp) is counted as untracked in the child. */
    unsigned int own = gate_depth, seen;
    long deadline = monotonic_ns() + GATE_WAIT_NS;
    struct timespec left;
    while ((seen = GATE_COUNT(__atomic_load_n(&gate.word, __ATOMIC_SEQ_CST))) > own &&
           time_left(deadline, &left))
        futex_wait(&gate.half[GATE_COUNT_HALF], seen, &left);
    /* Repair here too, not only in the child, so the parent stops losing
     * descriptors to the plain functions. */
    if (repair_slots())
        forget_table();
    errno = saved;
}

void zmqfork__fdtrack_parent(void)
{
    int saved = errno;
    if (__atomic_load_n(&token_ptr, __ATOMIC_ACQUIRE) != NULL &&
        __atomic_sub_fetch(&pending, 1, __ATOMIC_SEQ_CST) == 0)
        futex_wake_all(&pending);
    errno = saved;
}

/*
 * The cleanup, once per process.  `deferred`: not inside the fork (a fork
 * that skipped the handlers), so the child's own code may have run since,
 * and every number is identified before it is closed (see identify()).
 */
static void cleanup(int deferred)
{
    pid_t self = getpid();
    pid_t claimed = __atomic_load_n(&claimed_pid, __ATOMIC_SEQ_CST);
    if (claimed == self ||
        !__atomic_compare_exchange_n(&claimed_pid, &claimed, self, 0, __ATOMIC_SEQ_CST,
                                     __ATOMIC_SEQ_CST)) {
        /* Already cleaned in this process (a zmqfork_refresh() from a signal
         * handler before the atfork child handler, or another thread's catch
         * up): the table holds this process's descriptors now.  Only the
         * token moved on. */
        if (!pid_mode && claimed == self)
            __atomic_store_n(&table_token, *token_ptr, __ATOMIC_RELEASE);
        return;
    }
    pid_t owner = __atomic_load_n(&table_pid, __ATOMIC_SEQ_CST);
    /* Calls of other threads still inside the gate, or outside it, at the
     * fork (the bounded wait gave up on them): each may have left a
     * descriptor open and untracked here.  This thread's own calls that a
     * signal handler interrupted to fork resume here and finish. */
    uint64_t old_gate = __atomic_load_n(&gate.word, __ATOMIC_SEQ_CST);
    unsigned int count = GATE_COUNT(old_gate);
    long in_flight = (long)(count > gate_depth ? count - gate_depth : 0);
    unsigned int out = __atomic_load_n(&outside, __ATOMIC_SEQ_CST);
    in_flight += (long)(out > outside_depth ? out - outside_depth : 0);
    /* No other thread of this process is inside the gate (see the top); calls
     * of this thread that a signal handler interrupted to fork will leave in
     * the old epoch, without touching the new count. */
    __atomic_store_n(&gate.word, (uint64_t)(GATE_EPOCH(old_gate) + 1u) << 32, __ATOMIC_SEQ_CST);
    __atomic_store_n(&outside, outside_depth, __ATOMIC_SEQ_CST);
    __atomic_store_n(&pending, 0, __ATOMIC_SEQ_CST);
    if (!deferred)
        reset_install_lock();
    uint64_t *map = __atomic_load_n(&bitmap, __ATOMIC_ACQUIRE);
    long closed = 0, leaked = in_flight;
    if (map != NULL) {
        /* The child's copy of the slots tells whether a close() slot held
         * anything but the wrapper at any time up to the fork (only
         * repair_slots() puts a wrapper back, and it forgets the table when
         * it does): if so, a number in the table may have been closed and
         * reused, and closing it here could hit a descriptor that is not
         * libzmq's. */
        if (repair_slots())
            forget_table();
        struct asker kcmp = {deferred && getppid() == owner ? owner : 0, self};
        unsigned int words = (__atomic_load_n(&high, __ATOMIC_RELAXED) + 63) / 64;
        for (unsigned int w = 0; w < words; w++) {
            uint64_t bits = map[w];
            if (bits == 0)
                continue;
            map[w] = 0;
            while (bits != 0) {
                int fd = (int)(w * 64 + (unsigned int)__builtin_ctzll(bits));
                bits &= bits - 1;
                enum identity id = identify(fd, &prints[fd], deferred, &kcmp);
                if (id == ID_OURS) {
                    (void)close(fd); /* close only: the description is shared */
                    closed++;
                } else {
                    leaked += id == ID_UNKNOWN;
                }
            }
        }
        for (int i = 0; i < OVERFLOW_SLOTS; i++) {
            int fd = overflow[i].fd;
            if (fd < 0)
                continue;
            enum identity id = identify(fd, &overflow[i].print, deferred, &kcmp);
            overflow[i].print = (struct print){0, 0};
            overflow[i].fd = -1;
            if (id == ID_OURS) {
                (void)close(fd);
                closed++;
            } else {
                leaked += id == ID_UNKNOWN;
            }
        }
        __atomic_store_n(&tracked_now, 0, __ATOMIC_RELAXED);
    }
    __atomic_store_n(&closed_last, closed, __ATOMIC_RELAXED);
    __atomic_add_fetch(&closed_total, closed, __ATOMIC_RELAXED);
    __atomic_add_fetch(&untracked, leaked, __ATOMIC_RELAXED);
    /* Publish "the table is right for this process" last. */
    if (!pid_mode)
        __atomic_store_n(&table_token, *token_ptr, __ATOMIC_RELEASE);
    __atomic_store_n(&table_pid, self, __ATOMIC_RELEASE);
}

void zmqfork__fdtrack_child(int deferred)
{
    int saved = errno;
    if (__atomic_load_n(&token_ptr, __ATOMIC_ACQUIRE) != NULL)
        cleanup(deferred);
    else if (!deferred)
        reset_install_lock();
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
    if (nwatched + count_watched(elf, slots, closers, 1) +
            count_watched(elf, slots + closers, total - closers, 0) >
        MAX_WATCHED)
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

/*
 * Everything the wrappers and handlers read must be set before the first slot
 * is patched: the table, the owner, the mode, the token; token_ptr, published
 * last with a release store, is what they check (with acquire) first.
 * Returns ZMQFORK_FDTRACK_ON or fills *why.
 */
static int prepare_gate(struct failure *why)
{
    if (__atomic_load_n(&token_ptr, __ATOMIC_ACQUIRE) != NULL)
        return ZMQFORK_FDTRACK_ON;
    int err = table_init();
    if (err != 0)
        return fail(why, ZMQFORK_FDTRACK_ENOMEM, "cannot map the descriptor table: %s",
                    strerror(err));
    pid_mode = !(zmqfork_mechanisms() & ZMQFORK_MECH_WIPEONFORK);
    /* refresh(), not the token: after a raw fork the token still reads 0. */
    uint64_t token = zmqfork_refresh();
    __atomic_store_n(&table_token, pid_mode ? 0 : token, __ATOMIC_RELAXED);
    __atomic_store_n(&table_pid, getpid(), __ATOMIC_RELAXED);
    __atomic_store_n(&claimed_pid, getpid(), __ATOMIC_RELAXED);
    __atomic_store_n(&token_ptr, zmqfork_token(), __ATOMIC_RELEASE);
    return ZMQFORK_FDTRACK_ON;
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
    else if (locate_libzmq(backend_path, &addr, &why) == ZMQFORK_FDTRACK_ON &&
             prepare_gate(&why) == ZMQFORK_FDTRACK_ON)
        hook_object_at(addr, names, sizeof names, name, sizeof name, &why);
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
    else if (prepare_gate(&why) == ZMQFORK_FDTRACK_ON)
        hook_object_at(map->l_ld, names, sizeof names, name, sizeof name, &why);
    if (handle != NULL)
        dlclose(handle);
    pthread_mutex_unlock(&install_lock);
    return why.code;
}


void zmqfork_testing_fdtrack_delay(unsigned int microseconds)
{
    __atomic_store_n(&testing_delay_us, microseconds, __ATOMIC_RELAXED);
}

void zmqfork_testing_fdtrack_table_size(unsigned int descriptors)
{
    pthread_mutex_lock(&install_lock);
    testing_table_bits = descriptors;
    pthread_mutex_unlock(&install_lock);
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

void zmqfork_fdtrack_counts(struct zmqfork_fdtrack_counts *out)
{
    out->tracked = __atomic_load_n(&tracked_now, __ATOMIC_RELAXED);
    out->closed_last = __atomic_load_n(&closed_last, __ATOMIC_RELAXED);
    out->closed_total = __atomic_load_n(&closed_total, __ATOMIC_RELAXED);
    out->untracked = __atomic_load_n(&untracked, __ATOMIC_RELAXED);
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
        int fd = __atomic_load_n(&overflow[i].fd, __ATOMIC_RELAXED);
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
void zmqfork__fdtrack_child(int deferred) { (void)deferred; }

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
void zmqfork_testing_fdtrack_table_size(unsigned int descriptors) { (void)descriptors; }
unsigned int zmqfork_testing_fdtrack_in_window(void) { return 0; }
void zmqfork_testing_fdtrack_fail_patch(unsigned int after_slots, void (*before_failing)(void))
{
    (void)after_slots, (void)before_failing;
}

void zmqfork_fdtrack_counts(struct zmqfork_fdtrack_counts *out)
{
    *out = (struct zmqfork_fdtrack_counts){0, 0, 0, 0};
}
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
