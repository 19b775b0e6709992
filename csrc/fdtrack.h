/*
 * fdtrack.h - what the files of descriptor tracking share; not exported.
 *
 *   fdtrack_table.c    the table (numbers and prints), identity of a number
 *   fdtrack_gate.c     the fork gate and the table's owner (token, pid)
 *   fdtrack_hooks.c    the wrappers and descriptor tracking's fork handlers
 *   fdtrack_install.c  the install, the watched GOT slots, the outcome
 *   fdtrack_stubs.c    everything above, for systems without ELF/GOT support
 *
 * The contract is zmqfork.h (exported) and internal.h (fork handlers); the
 * design, summed up here, is what ties these files together.
 *
 * Invariants
 *   - A descriptor is in the table iff a hooked call of the hooked object
 *     created it (or dup2/dup3'd onto it) and no hooked close() removed it.
 *   - close() removes the number from the table *before* the real close, so a
 *     number another thread gets back from the kernel right after is never in
 *     the table by mistake.
 *   - A tracked number carries the print of its file (st_dev, st_ino), and
 *     an eventfd or epoll's description libzmq's mark (F_SETSIG), both
 *     stored before its bit is set; the cleanup closes a number only if it
 *     still shows that print (an eventfd or epoll: that mark), and, when
 *     deferred, anything but a socket or an eventfd or epoll only if kcmp()
 *     against the parent confirms it (see identify() in fdtrack_table.c, and
 *     the INVARIANT in zmqfork.h).
 *   - The real call and its table update happen inside the *gate*; the
 *     prepare handler closes the gate and waits (at most GATE_WAIT_NS) until
 *     no call of another thread is inside, so in the child the table says
 *     exactly which descriptors are libzmq's, but for the calls the wait gave
 *     up on, counted as untracked (see the signal-handler case below too).
 *     The ordering of create/track and untrack/close makes every such
 *     inexactness a leak, never a wrong close.
 *
 * The gate: the count in `zmqfork__gate` is the calls inside; `pending`
 *   counts forks between their prepare and parent handlers.  A call increments the count,
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
 *   the bound only.  A wrapper leaves the gate through an exit guard (below):
 *   on return, and with glibc also when a cancellation or a longjmp() out of
 *   a signal handler discards its frame, exactly once.  musl's longjmp runs
 *   no cleanup and its cancellation does not unwind: a thread cancelled or
 *   jumped out of a hooked call there stays counted, and forks wait the
 *   bound.
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
#ifndef ZMQFORK_FDTRACK_H
#define ZMQFORK_FDTRACK_H

#include "internal.h"

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* The published outcome of the install (fdtrack_install.c); on every system.
 * Stores `code` and `message` as the install's result (under the install
 * lock).  For the non-Linux install. */
void zmqfork__fdtrack_publish(int code, const char *message);

#ifdef __linux__

/* ---- the table (fdtrack_table.c) ---------------------------------------- */

/* What fstat() said about a tracked descriptor when it was tracked.  {0, 0}:
 * unknown (fstat failed, or a fork caught the entry half-written). */
struct print {
    uint64_t dev;
    uint64_t ino;
};

/* The mark on the eventfd and epoll descriptions libzmq made (fdtrack_table.c's
 * mark()): F_SETSIG to a signal only O_ASYNC would send, which neither kind
 * supports.  62, not SIGRTMAX: qemu-user keeps the guest's two highest
 * signals for itself and refuses them. */
#define MARK_SIG 62
#ifndef F_SETSIG
#define F_SETSIG 10
#define F_GETSIG 11
#endif

/* Maps the table, once; 0 or an errno value.  Under the install lock. */
int zmqfork__table_init(void);
/* Records fd (< 0: nothing), an eventfd or epoll descriptor if `anonymous`;
 * removes it. */
void zmqfork__track(int fd, int anonymous);
void zmqfork__untrack(int fd);
/* Empties the table, closing nothing; counts what it held as untracked. */
void zmqfork__table_forget(void);
/* The table's part of a child's cleanup (see fdtrack_table.c). */
void zmqfork__table_cleanup(int deferred, pid_t parent, long in_flight);

/* ---- the watched GOT slots (fdtrack_install.c) ------------------------- */

/* Puts back the wrappers the lazy binder overwrote; 1 if any close() slot
 * held anything but the wrapper (the table must then be forgotten). */
int zmqfork__slots_repair(void);
/* In a child made inside fork(): a fresh install lock (see fdtrack_install.c). */
void zmqfork__install_lock_reset(void);

/* ---- the wrappers (fdtrack_hooks.c) ------------------------------------- */

struct zmqfork__hook {
    const char *name;
    void *wrapper;
    int closes; /* 1 for close: without it the table would go stale */
};

/* Every hooked function and its wrapper, close first: the slots are patched
 * in this order, and a descriptor tracked while close was still unpatched
 * could be closed untracked, leaving a stale number a child would later close
 * for someone else. */
extern const struct zmqfork__hook zmqfork__hooks[];
extern const size_t zmqfork__nhooks;

/* ---- the gate (fdtrack_gate.c) ------------------------------------------ */

/*
 * The gate word: the calls inside it in the low 32 bits, the gate's epoch in
 * the high 32 bits.  A child's cleanup empties the count and starts a new
 * epoch in one store; a call that entered in an older epoch (the forking
 * thread's own, interrupted by the signal handler that forked) leaves without
 * touching the count.  A call learns its epoch from the value its own atomic
 * increment returned, so wherever the fork interrupted it, the child's copy of
 * the call knows whether its increment is in the count it sees.
 */
union zmqfork__gate_word {
    uint64_t word;
    unsigned int half[2]; /* futex word: the half holding the count */
};
extern union zmqfork__gate_word zmqfork__gate;
#define GATE_COUNT(word) ((unsigned int)((word) & 0xffffffffu))
#define GATE_EPOCH(word) ((unsigned int)((word) >> 32))
#define GATE_COUNT_HALF (__BYTE_ORDER__ == __ORDER_BIG_ENDIAN__)

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
extern __thread unsigned int zmqfork__gate_depth GATE_DEPTH_TLS_MODEL;
/* This thread's calls in flight outside the gate (see zmqfork__gate_outside). */
extern __thread unsigned int zmqfork__gate_outside_depth GATE_DEPTH_TLS_MODEL;

/* Calls in flight outside the gate, of all threads: an accept with no client
 * pending, whose wait no fork waits for.  A fork during one may leave its new
 * descriptor untracked in the child; the child counts them. */
extern unsigned int zmqfork__gate_outside;
/* Forks between their prepare and parent handlers. */
extern unsigned int zmqfork__gate_pending;
/* zmqfork_token(); published (release) at install after everything the
 * wrappers read, and read with acquire by each of them: no wrapper, on any
 * CPU, sees the table or the tokens before they are set. */
extern volatile uint64_t *zmqfork__gate_token_ptr;
/* The token under which the table is right; 0 in pid mode (see fdtrack_gate.c). */
extern uint64_t zmqfork__gate_table_token;

/* The slow paths of gate_enter() and gate_leave() (fdtrack_gate.c). */
void zmqfork__gate_catch_up(void);
int zmqfork__gate_wait_for_fork(void);
void zmqfork__gate_wake_preparer(void);

/* Install time, after the table: sets the owner and the mode, then publishes
 * the token pointer; the slots may be patched after this. */
void zmqfork__gate_open(void);
/* Whether zmqfork__gate_open() ran (in this process or an ancestor). */
int zmqfork__gate_installed(void);
/* The fork handlers' part of the gate: prepare closes it and waits (bounded),
 * parent reopens it. */
void zmqfork__gate_prepare(void);
void zmqfork__gate_parent(void);
/* The child's cleanup: 1 if this call is the process's one cleanup (else it
 * republishes the token, if the table is already this process's); then
 * reset() empties the gate and returns the calls it found in flight, owner()
 * is the pid the table belonged to, publish() makes the table this
 * process's. */
int zmqfork__gate_claim(void);
long zmqfork__gate_reset(void);
pid_t zmqfork__gate_owner(void);
void zmqfork__gate_publish(void);

static inline void gate_leave(unsigned int epoch)
{
    uint64_t seen = __atomic_load_n(&zmqfork__gate.word, __ATOMIC_SEQ_CST);
    while (GATE_EPOCH(seen) == epoch &&
           !__atomic_compare_exchange_n(&zmqfork__gate.word, &seen, seen - 1, 1, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST)) {
    }
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    zmqfork__gate_depth--;
    /* A preparer may wait for a count other than zero (its own calls). */
    if (__builtin_expect(__atomic_load_n(&zmqfork__gate_pending, __ATOMIC_SEQ_CST) != 0, 0))
        zmqfork__gate_wake_preparer();
}

/* Returns the epoch to hand to gate_leave(). */
static inline unsigned int gate_enter(void)
{
    for (;;) {
        volatile uint64_t *token = __atomic_load_n(&zmqfork__gate_token_ptr, __ATOMIC_ACQUIRE);
        if (__builtin_expect(__atomic_load_n(token, __ATOMIC_RELAXED) !=
                                 __atomic_load_n(&zmqfork__gate_table_token, __ATOMIC_RELAXED),
                             0))
            zmqfork__gate_catch_up();
        zmqfork__gate_depth++;
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        unsigned int epoch = GATE_EPOCH(__atomic_fetch_add(&zmqfork__gate.word, 1, __ATOMIC_SEQ_CST));
        if (__builtin_expect(__atomic_load_n(&zmqfork__gate_pending, __ATOMIC_SEQ_CST) == 0, 1))
            return epoch;
        gate_leave(epoch);
        if (!zmqfork__gate_wait_for_fork()) {
            /* Gave way: go in while the fork is pending (see wait_for_fork). */
            zmqfork__gate_depth++;
            __atomic_signal_fence(__ATOMIC_SEQ_CST);
            return GATE_EPOCH(__atomic_fetch_add(&zmqfork__gate.word, 1, __ATOMIC_SEQ_CST));
        }
    }
}

/*
 * Leaving a scope however it ends.  An exit guard runs its scope's exit
 * action when the scope returns (the cleanup attribute of the scope's
 * variable) and, with glibc, when a longjmp() or a cancellation discards the
 * scope's frame.  glibc keeps a per-thread chain of old-style cleanup buffers
 * (pthread.h's struct _pthread_cleanup_buffer, linked by
 * _pthread_cleanup_push and unlinked by _pthread_cleanup_pop: exported by
 * libc, by libpthread before 2.34, though no header declares them now).
 * longjmp, siglongjmp, _longjmp and __longjmp_chk first run and unlink every
 * buffer in a frame the jump discards (_longjmp_unwind ->
 * __pthread_cleanup_upto), and a cancellation's forced unwind runs and
 * unlinks each buffer as it leaves its frame (unwind_stop), with or without
 * -fexceptions; also from a handler on an alternate signal stack (glibc
 * compares addresses relative to the thread's stack).  The guard's buffer
 * lives in the scope's frame.  glibc's routine clears `linked` and runs the
 * action; the scope's end runs the action, then unlinks the buffer if still
 * linked.  A cancellation of a module built with -fexceptions runs both, and
 * a signal may jump out between the scope's action and its unlink: so the
 * action is idempotent (its owner sets a flag after raising a count and
 * clears it before lowering the count).  Plain memory and two stores to the
 * thread descriptor: async-signal-safe.  Other C libraries: musl's longjmp
 * runs no cleanup, and leaves musl's own cleanup buffers on the thread's chain
 * (pthread_exit would call them in a dead frame), so there the guard is the
 * cleanup attribute alone, which musl's cancellation, not unwinding, does not
 * run either.
 */
#if defined(__GLIBC__) && !defined(__UCLIBC__)
#define EXIT_GUARD_BUFFER 1
extern void _pthread_cleanup_push(struct _pthread_cleanup_buffer *buffer, void (*routine)(void *),
                                  void *arg);
extern void _pthread_cleanup_pop(struct _pthread_cleanup_buffer *buffer, int execute);
#endif

struct exit_guard {
#ifdef EXIT_GUARD_BUFFER
    struct _pthread_cleanup_buffer buffer;
#endif
    unsigned char linked; /* the buffer is on glibc's chain */
};

/* Links the guard: `unwound(arg)` runs if glibc discards the frame; it must
 * call guard_unwound() and then the scope's exit action. */
static inline void guard_link(struct exit_guard *guard, void (*unwound)(void *), void *arg)
{
#ifdef EXIT_GUARD_BUFFER
    _pthread_cleanup_push(&guard->buffer, unwound, arg);
    guard->linked = 1;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
#else
    (void)guard;
    (void)unwound;
    (void)arg;
#endif
}

/* In the `unwound` routine: glibc has unlinked the buffer already. */
static inline void guard_unwound(struct exit_guard *guard)
{
    guard->linked = 0;
}

/* At the scope's end, after its exit action: unlinks the buffer, if glibc
 * has not.  A signal before the unlink finds the action done: its longjmp
 * runs it again, to no effect. */
static inline void guard_unlink(struct exit_guard *guard)
{
#ifdef EXIT_GUARD_BUFFER
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    if (guard->linked) {
        guard->linked = 0;
        _pthread_cleanup_pop(&guard->buffer, 0);
    }
#else
    (void)guard;
#endif
}

/*
 * A wrapper's pass through the gate.  Declared with PASS, it leaves the gate
 * when the wrapper's scope ends, also when a cancellation unwinds it or a
 * longjmp() from a signal handler leaves it (glibc: see the exit guard).  A
 * flag is cleared before its count is lowered, so a pass is never left
 * twice; a signal whose handler jumps out between the count's change and its
 * flag's (a few instructions) leaves the call counted: forks then wait the
 * bound, not forever.
 */
struct pass {
    struct exit_guard guard;
    unsigned int epoch;
    unsigned char inside;  /* counted in the gate */
    unsigned char outside; /* counted in `outside` */
};

/* The pass's exit action; idempotent. */
static inline void pass_leave(struct pass *pass)
{
    if (pass->inside) {
        pass->inside = 0;
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        gate_leave(pass->epoch);
    }
    if (pass->outside) {
        pass->outside = 0;
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        __atomic_sub_fetch(&zmqfork__gate_outside, 1, __ATOMIC_SEQ_CST);
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        zmqfork__gate_outside_depth--;
    }
}

/* Run by glibc when a longjmp or a cancellation discards the wrapper's frame. */
static inline void pass_unwound(void *pass)
{
    guard_unwound(&((struct pass *)pass)->guard);
    pass_leave(pass);
}

static inline void pass_end(struct pass *pass)
{
    pass_leave(pass);
    guard_unlink(&pass->guard);
}

#define PASS                                                                                \
    struct pass pass_ __attribute__((cleanup(pass_end))) = {.inside = 0};                  \
    guard_link(&pass_.guard, pass_unwound, &pass_)

static inline void pass_enter(struct pass *pass)
{
    pass->epoch = gate_enter();
    pass->inside = 1;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
}

/* For a call that may block: counted outside the gate while it runs. */
static inline void pass_outside(struct pass *pass)
{
    zmqfork__gate_outside_depth++;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    __atomic_add_fetch(&zmqfork__gate_outside, 1, __ATOMIC_SEQ_CST);
    pass->outside = 1;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
}


#endif /* __linux__ */

#endif /* ZMQFORK_FDTRACK_H */
