/*
 * internal.h - functions shared between zmqfork's C files, not exported to
 * Python.  Names start with zmqfork__ (two underscores).
 */
#ifndef ZMQFORK_INTERNAL_H
#define ZMQFORK_INTERNAL_H

/*
 * Descriptor tracking's part of the fork handlers (fdtrack_hooks.c).  _prepare runs
 * in the forking thread before fork, _parent after it in the parent, _child
 * after it in the child: inside the fork (deferred = 0, the atfork child
 * handler), or later, from zmqfork_refresh() after a fork that skipped the
 * handlers (deferred = 1).  All three are async-signal-safe and leave errno
 * alone.  _prepare waits, at most 100 ms, until no other thread is inside a
 * hooked call; it does not wait for the forking thread's own (a fork from a
 * signal handler that interrupted one).  _prepare and _child also put back
 * wrappers the lazy binder overwrote, forgetting the table if a close() slot
 * held anything but the wrapper.  _child cleans at most once per process.
 */
void zmqfork__fdtrack_prepare(void);
void zmqfork__fdtrack_parent(void);
void zmqfork__fdtrack_child(int deferred);

/*
 * Resets every mutex registered with zmqfork_guard_recursive_mutex() to a
 * fresh, unlocked state (mutexguard.c), in the child.  deferred = 0: inside
 * the fork, where the forking thread is the only thread: every registered
 * mutex is reset.  deferred = 1: later (zmqfork_refresh() after a fork that
 * skipped the handlers), when the child may have started threads: only a
 * mutex held by a thread that is not in this process is reset (glibc; with
 * other C libraries nothing is reset then).  Async-signal-safe (plain stores,
 * getpid, tgkill with signal 0).
 */
void zmqfork__mutexguard_child(int deferred);

/*
 * ELF GOT patching (elfhook.c).  Linux only; elsewhere every function returns
 * ZMQFORK__ELF_ENOTLINUX.  Used at install time only: nothing here is
 * async-signal-safe, and callers serialise calls themselves.
 *
 * Usage: open the loaded object that contains an address, list the GOT slots
 * through which it calls a symbol, replace a batch of slots (all or none),
 * close the handle.  The handle only describes the object; closing it does
 * not undo a patch.
 */
#include <stddef.h>

typedef struct zmqfork__elf zmqfork__elf; /* opaque */

enum {
    ZMQFORK__ELF_OK = 0,
    ZMQFORK__ELF_ENOTLINUX,  /* built without ELF support (not Linux) */
    ZMQFORK__ELF_EARCH,      /* relocation types of this CPU are unknown */
    ZMQFORK__ELF_ENOTFOUND,  /* no loaded object contains the address */
    ZMQFORK__ELF_ENODYNAMIC, /* the object has no PT_DYNAMIC segment */
    ZMQFORK__ELF_EFORMAT,    /* dynamic section incomplete or unusable */
    ZMQFORK__ELF_ENOMEM,     /* out of memory */
    ZMQFORK__ELF_ERANGE,     /* more matching slots than the caller's array */
    ZMQFORK__ELF_ESLOT,      /* a slot lies outside the object's segments */
    ZMQFORK__ELF_EMPROTECT,  /* mprotect refused to make a page writable */
};

/* A static, human-readable message for an ZMQFORK__ELF_* code. */
const char *zmqfork__elf_strerror(int code);

/*
 * Opens the loaded object whose PT_LOAD segments contain `addr`.  On success
 * stores a new handle in *out and returns ZMQFORK__ELF_OK; on failure stores
 * NULL and returns the code.  *out is cleared on entry.
 */
int zmqfork__elf_open(const void *addr, zmqfork__elf **out);

/* The object's path as the loader knows it ("" for the main program). */
const char *zmqfork__elf_name(const zmqfork__elf *elf);

/*
 * Finds the GOT slots (JUMP_SLOT in DT_JMPREL, JUMP_SLOT and GLOB_DAT in
 * DT_RELA) through which the object reaches `symbol` (any version).  Stores
 * up to `max` slot addresses in slots[] and their number in *count (cleared
 * on entry).  Returns ZMQFORK__ELF_ERANGE, with nothing stored, when there
 * are more than `max`.
 */
int zmqfork__elf_find(const zmqfork__elf *elf, const char *symbol, void ***slots, size_t max,
                      size_t *count);

/*
 * Stores values[i] in *slots[i] for every i < n, all or none: a page that is
 * not writable (RELRO) is made writable for the write and given back its
 * protection after.  If a page cannot be made writable, every slot already
 * written gets its old value back and ZMQFORK__ELF_EMPROTECT is returned.
 * Each store is one aligned pointer-sized atomic write, so threads calling
 * through a slot meanwhile see the old or the new target, never a mix.
 */
int zmqfork__elf_replace(zmqfork__elf *elf, void **const *slots, void *const *values, size_t n);

/* Frees the handle (NULL is fine).  Patches stay. */
void zmqfork__elf_close(zmqfork__elf *elf);

/*
 * 1 if the page holding `slot` (a slot zmqfork__elf_find() returned) is
 * writable outside zmqfork__elf_replace(): not RELRO.  Only such a slot can
 * be written again by the loader (lazy binding of a JUMP_SLOT), and only such
 * a slot may be stored to without mprotect.
 */
int zmqfork__elf_slot_writable(const zmqfork__elf *elf, void **slot);

/* 1 if `addr` lies in one of the object's PT_LOAD segments (an unresolved
 * lazy JUMP_SLOT points there, at its PLT entry). */
int zmqfork__elf_owns(const zmqfork__elf *elf, const void *addr);

/*
 * TESTING ONLY.  Makes zmqfork__elf_replace() fail as if mprotect had refused
 * a page, when it is about to write a slot after `after` slots have been
 * written since this call (counted across replace calls): it first calls
 * `before` (unless NULL), then rolls back as on a real failure.  Fires once.
 */
void zmqfork__elf_testing_fail_after(unsigned int after, void (*before)(void));

#endif /* ZMQFORK_INTERNAL_H */
