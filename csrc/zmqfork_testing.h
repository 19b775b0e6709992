/*
 * zmqfork_testing.h - entry points for tests only: they widen race windows,
 * force failures and reach parts of descriptor tracking that a normal
 * process cannot (csrc/fdtrack_*.c define them; fdtrack_stubs.c elsewhere).
 * zmqfork.h is the contract; nothing here is part of it, and production code
 * never calls these.  Exported to Python through csrc/cdef.h, which
 * tests/test_detection.py checks against both headers.
 */
#ifndef ZMQFORK_TESTING_H
#define ZMQFORK_TESTING_H

/*
 * TESTING ONLY.  Hooks, in addition, the already-loaded object `path` itself
 * (its own imports of the same functions), so tests can prove the GOT patcher
 * on objects built with every RELRO mode.  Does not change what
 * zmqfork_fdtrack_status() reports.  Returns a ZMQFORK_FDTRACK_* code.
 */
int zmqfork_testing_fdtrack_hook_object(const char *path);

/*
 * TESTING ONLY.  Makes every creating wrapper sleep `microseconds` between the
 * real call and the table update, and close() between the table update and
 * the real close (0, the default, turns it off), so tests can fork exactly
 * while a call is in its window and prove the gate.  accept and accept4 also
 * sleep before they look for a pending client, outside the gate, so a test
 * can take that client first.  Thread-safe.
 */
void zmqfork_testing_fdtrack_delay(unsigned int microseconds);

/* TESTING ONLY.  How many hooked calls are sleeping in that window now. */
unsigned int zmqfork_testing_fdtrack_in_window(void);

/* TESTING ONLY.  Makes the table, when it is mapped (at the first install or
 * zmqfork_testing_fdtrack_hook_object), cover only `descriptors` numbers
 * (rounded up to 64) instead of the hard RLIMIT_NOFILE, so that tests reach
 * the overflow slots.  No effect once the table exists.  Thread-safe. */
void zmqfork_testing_fdtrack_table_size(unsigned int descriptors);

/*
 * TESTING ONLY.  Makes the next install (or zmqfork_testing_fdtrack_hook_object)
 * fail as if a GOT page could not be made writable, when it is about to patch
 * a slot after `after_slots` slots were patched; `before_failing` (may be
 * NULL) is called first, so that a test can make a hooked call through the
 * slots already patched.  Fires once.  Not thread-safe.
 */
void zmqfork_testing_fdtrack_fail_patch(unsigned int after_slots, void (*before_failing)(void));

#endif /* ZMQFORK_TESTING_H */
