/*
 * internal.h - functions shared between zmqfork's C files, not exported to
 * Python.  Names start with zmqfork__ (two underscores).
 */
#ifndef ZMQFORK_INTERNAL_H
#define ZMQFORK_INTERNAL_H

/*
 * Descriptor tracking's part of the fork handlers (fdtrack.c).  _prepare runs
 * in the forking thread before fork, _parent after it in the parent, _child
 * after it in the child (also from zmqfork_refresh() after a fork that
 * skipped the handlers).  All three are async-signal-safe and leave errno
 * alone.
 */
void zmqfork__fdtrack_prepare(void);
void zmqfork__fdtrack_parent(void);
void zmqfork__fdtrack_child(void);

#endif /* ZMQFORK_INTERNAL_H */
