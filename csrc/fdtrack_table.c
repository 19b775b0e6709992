/*
 * fdtrack_table.c - the table of descriptors libzmq owns, each with its print,
 * and the question a child's cleanup asks of each number: is it still
 * libzmq's file?  Contract: fdtrack.h (internal), zmqfork.h (the counters,
 * is_tracked, snapshot).  Everything here is lock-free atomics and plain
 * syscalls (fstat, fcntl, kcmp, close, close_range): async-signal-safe, no
 * allocation after zmqfork__table_init().
 */
#define _GNU_SOURCE
#include "zmqfork.h"
#include "zmqfork_testing.h"
#include "fdtrack.h"

#ifdef __linux__

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define TABLE_MIN_BITS 4096u
#define TABLE_MAX_BITS (1u << 24) /* 2 MiB of bitmap and 256 MiB of prints, reserved, touched only where used */
#define OVERFLOW_SLOTS 64

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
 * its print, learned at install (or from the first eventfd or epoll libzmq
 * makes, if the probe failed: at the descriptor limit), tells them from other
 * descriptors and spares them an fstat().  Published by `anon_known`. */
static struct print anon_print;
static int anon_known;
static long tracked_now;
static long closed_last;
static long closed_total;
static long untracked;
static long cleanup_ns;

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

/*
 * Whether the anonymous inode's print is known; if not, learns it from `fd`,
 * an eventfd or epoll descriptor.  Threads learning it at once store the same
 * print; readers see it whole once `anon_known` is set (release/acquire).
 */
static int learn_anon_print(int fd)
{
    if (__atomic_load_n(&anon_known, __ATOMIC_ACQUIRE))
        return 1;
    struct print print;
    take_print(fd, &print);
    if (print.dev == 0 && print.ino == 0)
        return 0;
    __atomic_store_n(&anon_print.dev, print.dev, __ATOMIC_RELAXED);
    __atomic_store_n(&anon_print.ino, print.ino, __ATOMIC_RELAXED);
    __atomic_store_n(&anon_known, 1, __ATOMIC_RELEASE);
    return 1;
}

static void store_print(struct print *to, const struct print *from)
{
    __atomic_store_n(&to->dev, from->dev, __ATOMIC_RELAXED);
    __atomic_store_n(&to->ino, from->ino, __ATOMIC_RELAXED);
}

static unsigned int testing_table_bits; /* 0: sized by the limit (zmqfork_testing_fdtrack_table_size) */

/* Maps the table and learns the anonymous inode's print; returns 0 or an errno value. */
int zmqfork__table_init(void)
{
    struct rlimit limit;
    uint64_t want = TABLE_MIN_BITS;
    unsigned int testing_bits = __atomic_load_n(&testing_table_bits, __ATOMIC_RELAXED);
    if (testing_bits != 0)
        want = testing_bits;
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
        (void)learn_anon_print(probe);
        (void)close(probe);
    }
    nbits = (unsigned int)want;
    prints = (struct print *)((char *)map + want / 8);
    __atomic_store_n(&bitmap, (uint64_t *)map, __ATOMIC_RELEASE);
    return 0;
}

/*
 * Marks the open file description of an eventfd or epoll descriptor as one
 * libzmq made: F_SETSIG stores MARK_SIG in it, where every descriptor of it,
 * in every process, reads it back with F_GETSIG.  Neither kind supports
 * O_ASYNC, the only use of that signal, so the mark changes nothing they do.
 * (Sockets are not marked: on a socket the application may turn O_ASYNC on,
 * and would then get the mark's signal instead of its own; and a socket's
 * print identifies its description already.)  Returns 0 if the mark could
 * not be set.  errno is kept.
 */
static int mark(int fd)
{
    int saved = errno;
    int done = fcntl(fd, F_SETSIG, MARK_SIG) == 0;
    errno = saved;
    return done;
}

/*
 * Records `fd` as libzmq's, with its print: for an eventfd or epoll
 * (`anonymous`), the anonymous inode's, and its description is marked (if
 * the mark cannot be set or the print is unknown, the print is left unknown:
 * the cleanup cannot tell the number's file and leaves it open, counted);
 * fstat's for anything else.
 * The print is stored before the entry is visible, so a fork (a raw one, or one from a
 * signal handler) between the two steps leaves no entry, never one with a
 * print of something else.  Tracking a number already tracked (dup2/dup3
 * onto libzmq's own descriptor) replaces its print and adds no duplicate.
 */
void zmqfork__track(int fd, int anonymous)
{
    if (fd < 0)
        return;
    struct print print = {0, 0};
    if (!anonymous)
        take_print(fd, &print);
    else if (learn_anon_print(fd) && mark(fd))
        print = anon_print;
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

void zmqfork__untrack(int fd)
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
void zmqfork__table_forget(void)
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
#define ZMQFORK_KCMP_FILE 0  /* KCMP_FILE of <linux/kcmp.h>, the kernel ABI value */
#define ZMQFORK_KCMP_FILES 2 /* KCMP_FILES: the same descriptor table */
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

/* kcmp(KCMP_FILE): whether `fd` is the very file the parent holds at that number. */
static int same_as_parent(int fd, struct asker *kcmp)
{
#ifdef SYS_kcmp
    if (kcmp->parent > 0) {
        long same = syscall(SYS_kcmp, (long)kcmp->parent, (long)kcmp->self, (long)ZMQFORK_KCMP_FILE,
                            (long)fd, (long)fd);
        if (same == 0)
            return 1;
        if (same < 0)
            kcmp->parent = 0; /* not permitted (seccomp, ptrace rules) or not built: stop asking */
    }
#else
    (void)fd;
    (void)kcmp;
#endif
    return 0;
}

/*
 * Whether this process shares its descriptor table with its parent: a raw
 * clone(CLONE_FILES) without CLONE_VM has memory of its own (the token wiped,
 * so a deferred cleanup runs) but the very descriptors the parent's libzmq
 * is using, which no cleanup may close.  Unknown (no parent to ask, kcmp()
 * refused) counts as not shared.
 */
static int shares_descriptor_table(const struct asker *kcmp)
{
#ifdef SYS_kcmp
    return kcmp->parent > 0 &&
           syscall(SYS_kcmp, (long)kcmp->parent, (long)kcmp->self, (long)ZMQFORK_KCMP_FILES, 0L, 0L) == 0;
#else
    (void)kcmp;
    return 0;
#endif
}

/* Whether a print is the anonymous inode's: an eventfd or epoll descriptor, told apart by the mark. */
static int anonymous(const struct print *print)
{
    return __atomic_load_n(&anon_known, __ATOMIC_ACQUIRE) && print->dev == anon_print.dev &&
           print->ino == anon_print.ino;
}

/*
 * An eventfd or epoll number: the print cannot tell (all show the kernel's
 * one anonymous inode), the mark can: libzmq's descriptions carry it, the
 * application's do not.  One without the mark is left open and counted: it
 * is most likely the application's (its dup2 onto the number, or its close
 * and a reuse), but the application may also have reset libzmq's own mark
 * (F_SETSIG), and a leak must never go uncounted.  kcmp() would not help: the
 * parent may hold the application's file at that number too (its dup2 came
 * before the fork).  The same in a deferred cleanup: the child's own
 * eventfds have no mark either.  Not told apart: a copy of another of
 * libzmq's eventfds (the application's dup of one) put at the number; it is
 * closed.
 */
static enum identity identify_anonymous(int fd)
{
    int sig = fcntl(fd, F_GETSIG);
    if (sig < 0)
        return errno == EBADF ? ID_GONE : ID_UNKNOWN;
    return sig == MARK_SIG ? ID_OURS : ID_UNKNOWN;
}

/*
 * Inside the fork (handlers ran) the table is exact, so a number whose file
 * shows the print recorded for it is libzmq's, and one showing another print
 * was taken over (the application's dup2, or its close and a reuse).  A
 * deferred cleanup follows the child's own code, which may have closed
 * libzmq's number and opened another file of the same inode there: it closes
 * a socket on its print (a socket's inode belongs to exactly one open file
 * description), and anything else only where kcmp() against the parent
 * confirms it (kcmp alone would not do: the parent may have exited, and
 * inside the fork it cannot see a dup2 the application made before it);
 * eventfds and epolls on their mark (identify_anonymous).
 */
static enum identity identify(int fd, const struct print *recorded, int deferred, struct asker *kcmp)
{
    if (anonymous(recorded))
        return identify_anonymous(fd);
    struct stat st;
    if (fstat(fd, &st) != 0)
        return errno == EBADF ? ID_GONE : ID_UNKNOWN;
    if (recorded->dev == 0 && recorded->ino == 0)
        return ID_UNKNOWN;
    if ((uint64_t)st.st_dev != recorded->dev || (uint64_t)st.st_ino != recorded->ino)
        return ID_OTHER;
    if (!deferred || S_ISSOCK(st.st_mode) || same_as_parent(fd, kcmp))
        return ID_OURS;
    return ID_UNKNOWN;
}

/*
 * Closes [first, first + count) (none if count is 0): numbers identify() just called libzmq's,
 * in a child made by a fork that ran the handlers (one thread, nothing runs
 * between the two steps).  One close_range() for a run of them; close() each
 * where the kernel has none (before 5.9).
 */
static void close_run(int first, int count)
{
#ifdef SYS_close_range
    if (count > 1 && syscall(SYS_close_range, (unsigned int)first, (unsigned int)(first + count - 1), 0u) == 0)
        return;
#endif
    for (int fd = first; fd < first + count; fd++)
        (void)close(fd); /* close only: the description is shared */
}

/*
 * The table's part of a child's cleanup: closes every number identify() says
 * is libzmq's, empties the table, and counts what was closed and what was
 * left open (`in_flight`, the calls the fork did not wait for, included).
 * `parent`: the pid to ask with kcmp() in a deferred cleanup, 0 for none.
 */
void zmqfork__table_cleanup(int deferred, pid_t parent, long in_flight)
{
    struct timespec start, end;
    (void)clock_gettime(CLOCK_MONOTONIC, &start); /* async-signal-safe */
    uint64_t *map = __atomic_load_n(&bitmap, __ATOMIC_ACQUIRE);
    long closed = 0, leaked = in_flight;
    if (map != NULL) {
        /* The child's copy of the slots tells whether a close() slot held
         * anything but the wrapper at any time up to the fork (only
         * repair_slots() puts a wrapper back, and it forgets the table when
         * it does): if so, a number in the table may have been closed and
         * reused, and closing it here could hit a descriptor that is not
         * libzmq's.  Nor is it closed in a table shared with the parent. */
        struct asker kcmp = {parent, getpid()};
        if (zmqfork__slots_repair() || (deferred && shares_descriptor_table(&kcmp)))
            zmqfork__table_forget();
        /* Consecutive numbers found libzmq's, not closed yet (inside the fork
         * only: a deferred cleanup closes each at once, as the child's other
         * threads may be closing and opening descriptors meanwhile). */
        int run_first = 0, run_count = 0;
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
                if (id != ID_OURS) {
                    leaked += id == ID_UNKNOWN;
                    continue;
                }
                closed++;
                if (deferred) {
                    close_run(fd, 1);
                } else if (run_count > 0 && fd == run_first + run_count) {
                    run_count++;
                } else {
                    close_run(run_first, run_count);
                    run_first = fd;
                    run_count = 1;
                }
            }
        }
        close_run(run_first, run_count);
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
    (void)clock_gettime(CLOCK_MONOTONIC, &end);
    __atomic_store_n(&cleanup_ns, (end.tv_sec - start.tv_sec) * 1000000000L + (end.tv_nsec - start.tv_nsec),
                     __ATOMIC_RELAXED);
}

/* ---- exported: zmqfork.h ---- */

void zmqfork_fdtrack_counts(struct zmqfork_fdtrack_counts *out)
{
    out->tracked = __atomic_load_n(&tracked_now, __ATOMIC_RELAXED);
    out->closed_last = __atomic_load_n(&closed_last, __ATOMIC_RELAXED);
    out->closed_total = __atomic_load_n(&closed_total, __ATOMIC_RELAXED);
    out->untracked = __atomic_load_n(&untracked, __ATOMIC_RELAXED);
    out->cleanup_ns = __atomic_load_n(&cleanup_ns, __ATOMIC_RELAXED);
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

void zmqfork_testing_fdtrack_table_size(unsigned int descriptors)
{
    __atomic_store_n(&testing_table_bits, descriptors, __ATOMIC_RELAXED);
}

#endif /* __linux__ */
