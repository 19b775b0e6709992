/*
 * fdtrack_gate.c - the fork gate: hooked calls go in, a fork closes it and
 * waits (at most GATE_WAIT_NS) for the calls inside; and the table's owner:
 * which process the table lists descriptors of (the token, or getpid() in pid
 * mode), and the once-per-process claim of a child's cleanup.  Contract:
 * fdtrack.h (the fast path is inline there), the overview at its top.  Only
 * atomics, futex, clock_gettime, getpid, getppid: async-signal-safe.
 */
#define _GNU_SOURCE
#include "zmqfork.h"
#include "fdtrack.h"

#ifdef __linux__

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* The longest a fork waits for calls inside the gate, and a call for a fork
 * to finish (zmqfork.h): 100 ms. */
#define GATE_WAIT_NS (100L * 1000 * 1000)

union zmqfork__gate_word zmqfork__gate;
__thread unsigned int zmqfork__gate_depth GATE_DEPTH_TLS_MODEL;
__thread unsigned int zmqfork__gate_outside_depth GATE_DEPTH_TLS_MODEL;
unsigned int zmqfork__gate_outside;
unsigned int zmqfork__gate_pending;
volatile uint64_t *zmqfork__gate_token_ptr;
uint64_t zmqfork__gate_table_token;

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
    return __atomic_load_n(zmqfork__gate_token_ptr, __ATOMIC_SEQ_CST) ==
           __atomic_load_n(&zmqfork__gate_table_token, __ATOMIC_ACQUIRE);
}

/*
 * A fork without handlers happened (or pid mode's check): clean up, once per
 * process, and wait until the cleanup is published.
 */
__attribute__((noinline, cold)) void zmqfork__gate_catch_up(void)
{
    int saved = errno;
    if (pid_mode) {
        pid_t self = getpid();
        if (__atomic_load_n(&table_pid, __ATOMIC_ACQUIRE) != self) {
            zmqfork__fdtrack_child(1);
            while (__atomic_load_n(&table_pid, __ATOMIC_ACQUIRE) != self)
                sched_yield();
        }
    } else {
        uint64_t current = zmqfork_refresh(); /* its winner runs the cleanup */
        while (__atomic_load_n(&zmqfork__gate_table_token, __ATOMIC_ACQUIRE) != current &&
               __atomic_load_n(zmqfork__gate_token_ptr, __ATOMIC_SEQ_CST) == current)
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
__attribute__((noinline, cold)) int zmqfork__gate_wait_for_fork(void)
{
    int saved = errno, done = 1;
    unsigned int seen;
    long deadline = monotonic_ns() + GATE_WAIT_NS;
    while ((seen = __atomic_load_n(&zmqfork__gate_pending, __ATOMIC_SEQ_CST)) != 0 && table_is_ours()) {
        struct timespec slice;
        if (!time_left(deadline, &slice)) {
            done = 0;
            break;
        }
        if (slice.tv_nsec > 20 * 1000 * 1000 || slice.tv_sec > 0)
            slice = (struct timespec){.tv_sec = 0, .tv_nsec = 20 * 1000 * 1000};
        futex_wait(&zmqfork__gate_pending, seen, &slice);
    }
    errno = saved;
    return done;
}

__attribute__((noinline, cold)) void zmqfork__gate_wake_preparer(void)
{
    int saved = errno;
    futex_wake_all(&zmqfork__gate.half[GATE_COUNT_HALF]);
    errno = saved;
}

void zmqfork__gate_open(void)
{
    pid_mode = !(zmqfork_mechanisms() & ZMQFORK_MECH_WIPEONFORK);
    /* refresh(), not the token: after a raw fork the token still reads 0. */
    uint64_t token = zmqfork_refresh();
    __atomic_store_n(&zmqfork__gate_table_token, pid_mode ? 0 : token, __ATOMIC_RELAXED);
    __atomic_store_n(&table_pid, getpid(), __ATOMIC_RELAXED);
    __atomic_store_n(&claimed_pid, getpid(), __ATOMIC_RELAXED);
    __atomic_store_n(&zmqfork__gate_token_ptr, zmqfork_token(), __ATOMIC_RELEASE);
}

int zmqfork__gate_installed(void)
{
    return __atomic_load_n(&zmqfork__gate_token_ptr, __ATOMIC_ACQUIRE) != NULL;
}

void zmqfork__gate_prepare(void)
{
    /* A process made by a fork that skipped the handlers, not caught up yet
     * (pid mode; with wipe-on-fork the forkdetect.c handler refreshed
     * first), inherited the gate as its parent's threads left it: catch up
     * first, or this would wait for calls no thread here will finish. */
    if (!table_is_ours())
        zmqfork__gate_catch_up();
    __atomic_add_fetch(&zmqfork__gate_pending, 1, __ATOMIC_SEQ_CST);
    /* Wait for every call inside the gate but this thread's own (a fork from
     * a signal handler that interrupted one cannot wait for it), at most
     * GATE_WAIT_NS: a call that does not come out (a blocking call,
     * with musl a thread cancelled or left by longjmp) is counted as
     * untracked in the child. */
    unsigned int own = zmqfork__gate_depth, seen;
    long deadline = monotonic_ns() + GATE_WAIT_NS;
    struct timespec left;
    while ((seen = GATE_COUNT(__atomic_load_n(&zmqfork__gate.word, __ATOMIC_SEQ_CST))) > own &&
           time_left(deadline, &left))
        futex_wait(&zmqfork__gate.half[GATE_COUNT_HALF], seen, &left);
}

void zmqfork__gate_parent(void)
{
    if (__atomic_sub_fetch(&zmqfork__gate_pending, 1, __ATOMIC_SEQ_CST) == 0)
        futex_wake_all(&zmqfork__gate_pending);
}

int zmqfork__gate_claim(void)
{
    pid_t self = getpid();
    pid_t claimed = __atomic_load_n(&claimed_pid, __ATOMIC_SEQ_CST);
    if (claimed != self &&
        __atomic_compare_exchange_n(&claimed_pid, &claimed, self, 0, __ATOMIC_SEQ_CST,
                                    __ATOMIC_SEQ_CST))
        return 1;
    /* Already cleaned in this process (a zmqfork_refresh() from a signal
     * handler before the atfork child handler, or another thread's catch
     * up): the table holds this process's descriptors now.  Only the token
     * moved on. */
    if (!pid_mode && claimed == self)
        __atomic_store_n(&zmqfork__gate_table_token, __atomic_load_n(zmqfork__gate_token_ptr, __ATOMIC_SEQ_CST), __ATOMIC_RELEASE);
    return 0;
}

long zmqfork__gate_reset(void)
{
    /* Calls of other threads still inside the gate, or outside it, at the
     * fork (the bounded wait gave up on them): each may have left a
     * descriptor open and untracked here.  This thread's own calls that a
     * signal handler interrupted to fork resume here and finish. */
    uint64_t old_gate = __atomic_load_n(&zmqfork__gate.word, __ATOMIC_SEQ_CST);
    unsigned int count = GATE_COUNT(old_gate), own = zmqfork__gate_depth;
    long in_flight = (long)(count > own ? count - own : 0);
    unsigned int out = __atomic_load_n(&zmqfork__gate_outside, __ATOMIC_SEQ_CST);
    unsigned int own_out = zmqfork__gate_outside_depth;
    in_flight += (long)(out > own_out ? out - own_out : 0);
    /* No other thread of this process is inside the gate (see the top); calls
     * of this thread that a signal handler interrupted to fork will leave in
     * the old epoch, without touching the new count. */
    __atomic_store_n(&zmqfork__gate.word, (uint64_t)(GATE_EPOCH(old_gate) + 1u) << 32,
                     __ATOMIC_SEQ_CST);
    __atomic_store_n(&zmqfork__gate_outside, own_out, __ATOMIC_SEQ_CST);
    __atomic_store_n(&zmqfork__gate_pending, 0, __ATOMIC_SEQ_CST);
    return in_flight;
}

pid_t zmqfork__gate_owner(void)
{
    return __atomic_load_n(&table_pid, __ATOMIC_SEQ_CST);
}

void zmqfork__gate_publish(void)
{
    /* Publish "the table is right for this process" last. */
    if (!pid_mode)
        __atomic_store_n(&zmqfork__gate_table_token, __atomic_load_n(zmqfork__gate_token_ptr, __ATOMIC_SEQ_CST), __ATOMIC_RELEASE);
    __atomic_store_n(&table_pid, getpid(), __ATOMIC_RELEASE);
}

#endif /* __linux__ */
