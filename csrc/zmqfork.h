/*
 * zmqfork.h - the whole contract of zmqfork's native module.
 *
 * Fork detection
 *   A process-wide *token* tells Python code which process generation it runs
 *   in.  The token is a non-zero 64-bit number; every fork makes the child's
 *   token differ from every token any of its ancestors ever had, so that an
 *   object that recorded the token when it was built can tell, with a single
 *   memory load, that it now lives in a child and must be rebuilt.
 *
 *   Two mechanisms move the token, chosen once in zmqfork_init():
 *     - pthread_atfork: the child handler allocates the next generation and
 *       stores it as the token (every fork that runs the handlers: fork(),
 *       os.fork()).
 *     - MADV_WIPEONFORK (Linux >= 4.14): the token lives in a private
 *       anonymous page the kernel zeroes in every child that does not share
 *       memory, so forks that skip the handlers (raw clone/fork syscalls,
 *       glibc _Fork) leave a zero token; zmqfork_refresh() then allocates the
 *       next generation.
 *
 *   Recipe for users of the token: read it (zmqfork_token()[0]); if it is not
 *   the value you recorded, call zmqfork_refresh(), drop your per-process
 *   state and record the value zmqfork_refresh() returned.
 *
 * Descriptor tracking (Linux; fdtrack_*.c, elfhook.c; testing entry points in
 *   zmqfork_testing.h)
 *   Declared below, after an overview; every function documents its own
 *   contract.
 *
 * Every exported name starts with zmqfork_.  Nothing here allocates in a fork
 * handler, takes a lock the forking thread cannot own, or calls into Python.
 */
#ifndef ZMQFORK_H
#define ZMQFORK_H

#include <stdint.h>

/* Bits of zmqfork_mechanisms(). */
#define ZMQFORK_MECH_ATFORK 1u     /* pthread_atfork handlers installed */
#define ZMQFORK_MECH_WIPEONFORK 2u /* token page is MADV_WIPEONFORK    */

/* Flags of zmqfork_init(): test switches that force a fallback. */
#define ZMQFORK_INIT_NO_ATFORK 1u     /* do not install pthread_atfork handlers */
#define ZMQFORK_INIT_NO_WIPEONFORK 2u /* do not mark the token page           */

/*
 * Sets up fork detection once per process; later calls (a reloaded Python
 * module, another import) return the first call's result and ignore flags.
 * Returns 0, or an errno value when no token page could be mapped (the module
 * is then unusable).  Thread-safe.
 */
int zmqfork_init(unsigned int flags);

/*
 * The address of the live token: 8 bytes, aligned, valid for the life of the
 * process.  Reading it is the whole fast-path check.  Never NULL after a
 * successful zmqfork_init().
 */
volatile uint64_t *zmqfork_token(void);

/*
 * The slow path: returns the current, non-zero token.  If the token reads
 * zero (a fork that skipped the atfork handlers wiped it), allocates the next
 * generation first, re-arms the token with it, and runs the descriptor
 * cleanup the child handler would have run.  Thread-safe: concurrent callers
 * agree on one token.  Async-signal-safe.  Returns 0 only if zmqfork_init()
 * never succeeded.
 */
uint64_t zmqfork_refresh(void);

/*
 * The address of one byte for the caller, in the token's page (so
 * wipe-on-fork, where in force, zeroes it in every child too), valid for the
 * life of the process: 0 in every child, set so by the child handler and by
 * zmqfork_refresh() when it catches up after a fork that skipped the
 * handlers.  The caller sets it to non-zero once it has noticed the fork: a
 * single byte load is then its whole fast-path check.  NULL before a
 * successful zmqfork_init().
 */
volatile uint8_t *zmqfork_noticed_flag(void);

/* Bitmask of ZMQFORK_MECH_* in force in this process.  Thread-safe. */
unsigned int zmqfork_mechanisms(void);

/*
 * Why wipe-on-fork is not in force: 0 when it is, else an errno value
 * (ENOSYS: not built for it; EINVAL: the kernel refused the advice;
 * EOPNOTSUPP: the kernel accepts invalid advice values, so its answer cannot
 * be trusted; ECANCELED: disabled by ZMQFORK_INIT_NO_WIPEONFORK).
 */
int zmqfork_wipeonfork_errno(void);

/* Same for the atfork handlers: 0 when installed, else an errno value. */
int zmqfork_atfork_errno(void);

/* ---- Descriptor tracking ------------------------------------------------
 *
 * At install, the GOT of the loaded object that holds libzmq is rewritten so
 * that its calls to socket, accept, accept4, eventfd, epoll_create(1),
 * socketpair, pipe(2), dup(2,3), open (and glibc's open64/__open_2 forms) and
 * close go through wrappers that record which descriptors libzmq owns, each
 * with a *print*: the st_dev and st_ino fstat() gave when it was recorded.
 * The wrappers return exactly what the real call returns, with its errno.
 * In a forked child the table's descriptors are closed with close() (or
 * close_range()) and nothing else (the open file descriptions are shared
 * with the parent):
 * before any other code of the child runs (atfork child handler), or, after a
 * fork that skipped the handlers, at the first zmqfork_refresh() or hooked
 * call (a *deferred* cleanup).  The cleanup runs once per process.
 *
 * INVARIANT: the child never closes a descriptor that is not, at that
 * moment, the very open file description libzmq had in the parent.
 *   - Each number's file is checked against what was recorded when libzmq
 *     made it: a socket, pipe or file against its print (fstat); an eventfd
 *     or epoll (all show the kernel's one anonymous inode) against the mark
 *     put on its open file description then (F_SETSIG to a signal only
 *     O_ASYNC would send, which these descriptors do not support; the
 *     application's have no mark).  Closed already, or showing another file
 *     (taken over by the application's dup2, or closed and reused), it is
 *     left alone; an eventfd or epoll without the mark is left open and
 *     counted as untracked (most likely the application's, but it may be
 *     libzmq's whose mark the application reset), as is a number whose print
 *     or mark could not be recorded.  Not told apart: a copy of another of
 *     libzmq's eventfds or epolls (the application's dup of one) put at a
 *     tracked eventfd's number is closed.  Inside the fork the table is
 *     exact (the fork gate below), so that check is the whole identity; runs
 *     of consecutive numbers are then closed with one close_range().  A
 *     deferred cleanup follows the child's own code, which may have closed
 *     libzmq's number and opened another file of the same inode there: it
 *     closes a socket on its print (a socket's inode belongs to exactly one
 *     open file description), an eventfd or epoll on its mark, and anything
 *     else only where kcmp(KCMP_FILE) says it is the very file the parent,
 *     still alive and still its parent, holds at that number; and nothing
 *     at all where kcmp(KCMP_FILES) says the child shares the parent's
 *     descriptor table (a raw clone(CLONE_FILES)).  Where it cannot tell (an
 *     open() file or pipe with the parent gone or kcmp refused), the
 *     descriptor stays open, counted as untracked: a leak, never a wrong
 *     close.
 *   - A close() slot of the hooked object (RELRO ones included) holding
 *     anything but the wrapper at a fork (the lazy binder's write, another
 *     library's hook, chaining or not) means close() calls may have bypassed
 *     the table: it is forgotten, its descriptors counted as untracked.
 *
 * The fork gate: a fork waits for hooked calls in flight in other threads,
 * at most 100 ms, then proceeds; a hooked call waits for a pending fork at
 * most 100 ms too (the forking thread may need what it holds: the GIL, a
 * lock), then proceeds.  Calls still in flight at a fork are counted as
 * untracked in the child (each may leave a descriptor there).  An accept
 * with no client pending (on a blocking listener, as libzmq's are, it would
 * wait for one: a listener shared with other processes, ZMQ_USE_FD) waits
 * outside the gate: no fork waits for it.  With glibc, a hooked call that a
 * cancellation or a longjmp()/siglongjmp() out of a signal handler ends
 * leaves the gate, once: the wrapper keeps one of glibc's cleanup buffers,
 * which both run.  With musl (its longjmp runs no cleanup, its cancellation
 * does not unwind) such a call stays counted: later forks wait the 100 ms,
 * never forever; so does a call a handler jumps out of in the few
 * instructions between its change of the count and its record of that
 * change.  A fork does not wait for a hooked call of its own
 * thread (a fork from a signal handler that interrupted it); that call
 * finishes in parent and child after the fork.
 *
 * Every fork kind, with or without wipe-on-fork: without it, a fork that
 * skipped the handlers leaves the token as it was, so each hooked call
 * compares getpid() with the table's owner instead (a syscall per hooked
 * call, only then), and the child's first hooked call, or fork, cleans up and
 * resets the gate its parent's threads left.
 *
 * Descriptors that are not libzmq's are never in the table.  If the lazy
 * binder wrote the plain close() over a patched slot (a first call in flight
 * during install, in an object bound lazily), the fork handlers put the
 * wrapper back (and forget the table, as above).
 */

/* Results of zmqfork_fdtrack_install() and zmqfork_fdtrack_status(). */
#define ZMQFORK_FDTRACK_ON 0           /* hooks installed, table kept */
#define ZMQFORK_FDTRACK_ENOTINSTALLED 1 /* zmqfork_fdtrack_install() never ran */
#define ZMQFORK_FDTRACK_ENOTLINUX 2    /* built for a system without ELF/GOT support */
#define ZMQFORK_FDTRACK_EARCH 3        /* CPU other than x86_64 / aarch64 */
#define ZMQFORK_FDTRACK_ENOBACKEND 4   /* the pyzmq backend object is not loaded */
#define ZMQFORK_FDTRACK_EOBJECT 5      /* the object holding libzmq cannot be read */
#define ZMQFORK_FDTRACK_ENOIMPORTS 6   /* it imports no descriptor call, or no close */
#define ZMQFORK_FDTRACK_ENOMEM 7       /* the table could not be mapped */
#define ZMQFORK_FDTRACK_EPATCH 8       /* a GOT page could not be made writable */

/*
 * Installs the hooks, once per process; later calls return the first call's
 * result.  `backend_path` is the file of pyzmq's compiled backend (for
 * Cython, zmq/backend/cython/_zmq*.so), already loaded: libzmq is the object
 * that defines zmq_ctx_new in its dependency tree (pyzmq.libs/libzmq-*.so, a
 * system libzmq.so.5, or the backend itself if libzmq is linked in), or the
 * backend itself if zmq_ctx_new is not exported.  Needs zmqfork_init() first.
 * Returns ZMQFORK_FDTRACK_ON or a ZMQFORK_FDTRACK_E* code; on failure nothing
 * is patched and everything else keeps working, except after a failure to
 * patch the creating calls once close() was patched (ZMQFORK_FDTRACK_EPATCH,
 * the reason says so): close() then stays hooked, so that a descriptor a
 * creating wrapper tracked before the rollback leaves the table when libzmq
 * closes it, instead of staying there for a child to close after its number
 * was reused.  A hooked object is made RTLD_NODELETE (the fork handlers read
 * its GOT).  Descriptors libzmq made before the install are not tracked.
 * Thread-safe; not async-signal-safe.
 */
int zmqfork_fdtrack_install(const char *backend_path);

/* ZMQFORK_FDTRACK_ON, ZMQFORK_FDTRACK_ENOTINSTALLED before any install, or
 * the install's failure code.  Thread-safe, async-signal-safe. */
int zmqfork_fdtrack_status(void);

/* Why tracking is off (a sentence naming the object and the cause), or "on".
 * Static storage, stable once the install returned.  Thread-safe. */
const char *zmqfork_fdtrack_reason(void);

/* The path of the hooked object as the loader knows it, "" when off. */
const char *zmqfork_fdtrack_object(void);

/* Comma-separated names of the functions hooked in it, "" when off. */
const char *zmqfork_fdtrack_functions(void);

/*
 * Descriptor tracking's counters, one shape from here to Python's
 * zmqfork.detection() (fds_<name>, fds_closed for closed_last):
 *   tracked       descriptors in the table now;
 *   closed_last   closed by the latest fork cleanup in this process (0 if
 *                 none ran);
 *   closed_total  closed by all cleanups in this process and its ancestors;
 *   untracked     descriptors of libzmq's that may survive into a child,
 *                 in this process and its ancestors: numbers that did not
 *                 fit the table (beyond its size and overflow slots), those
 *                 a forgotten table held, those a deferred cleanup could not
 *                 identify, and hooked calls in flight at a fork the bounded
 *                 wait gave up on (one each);
 *   cleanup_ns    how long the latest cleanup took, in nanoseconds of
 *                 CLOCK_MONOTONIC: identifying and closing libzmq's
 *                 inherited descriptors (0 if none ran; like closed_last,
 *                 a child made by a fork that skipped the handlers shows
 *                 its parent's until its own deferred cleanup has run).
 * Each is read with one atomic load, the five not as one snapshot.
 * Thread-safe, async-signal-safe.
 */
struct zmqfork_fdtrack_counts {
    long tracked;
    long closed_last;
    long closed_total;
    long untracked;
    long cleanup_ns;
};
void zmqfork_fdtrack_counts(struct zmqfork_fdtrack_counts *out);

/* 1 if `fd` is in the table, else 0.  Thread-safe, async-signal-safe. */
int zmqfork_fdtrack_is_tracked(int fd);

/* Stores up to `max` tracked descriptors in fds[], ascending, and returns how
 * many are tracked (possibly more than max).  A snapshot: descriptors made or
 * closed meanwhile by other threads may or may not appear.  Thread-safe. */
int zmqfork_fdtrack_snapshot(int *fds, int max);

/* ---- Mutexes a child gets back unlocked (mutexguard.c) ----------------- */

/*
 * Registers a recursive pthread mutex to be reset to a fresh, unlocked one in
 * every forked child (atfork child handler; after a fork that skipped the
 * handlers, zmqfork_refresh()): a lock another thread held at fork time
 * belongs to nobody in the child.  For pyzmq's zero-copy collector mutex.
 * The 8 latest registrations are kept.  Returns 0 (also if already
 * registered), EINVAL for NULL, or the errno of making the template mutex.
 * Thread-safe; not async-signal-safe.
 */
int zmqfork_guard_recursive_mutex(void *mutex);

#endif /* ZMQFORK_H */
