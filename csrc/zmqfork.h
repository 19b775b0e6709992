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
 * Descriptor tracking (Linux, see fdtrack.c / elfhook.c)
 *   Declared below; every function documents its own contract.
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
 * agree on one token.  Async-signal-safe.
 */
uint64_t zmqfork_refresh(void);

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

#endif /* ZMQFORK_H */
