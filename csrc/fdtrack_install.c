/*
 * fdtrack_install.c - the install: find the object holding libzmq, patch its
 * GOT slots for every hooked function (elfhook.c), publish the outcome; and
 * the watched slots the fork handlers repair.  Contract: zmqfork.h
 * (zmqfork_fdtrack_install and the status functions), fdtrack.h.  The install
 * runs under install_lock, not async-signal-safe; zmqfork__slots_repair() is.
 */
#define _GNU_SOURCE
#include "zmqfork.h"
#include "zmqfork_testing.h"
#include "fdtrack.h"

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


/*
 * In a child made by a fork that ran the handlers, only the forking thread
 * exists: an install another thread was in at the fork holds install_lock
 * for nobody.  Copies a fresh mutex over it byte by byte (no libc call),
 * only if it differs: a write would cost the child a copy-on-write fault of
 * the page for nothing in the usual case, no install under way.
 */
void zmqfork__install_lock_reset(void)
{
    static const pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    const volatile unsigned char *from = (const volatile unsigned char *)&fresh;
    volatile unsigned char *to = (volatile unsigned char *)&install_lock;
    size_t i = 0;
    while (i < sizeof install_lock && to[i] == from[i])
        i++;
    if (i == sizeof install_lock)
        return;
    for (i = 0; i < sizeof install_lock; i++)
        to[i] = from[i];
}

void zmqfork__fdtrack_publish(int code, const char *message)
{
    pthread_mutex_lock(&install_lock);
    snprintf(reason, sizeof reason, "%s", message);
    __atomic_store_n(&status, code, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&install_lock);
}

#ifdef __linux__

#include <dlfcn.h>
#include <link.h>
#include <unistd.h>

#define MAX_HOOKS 24
#define MAX_SLOTS_PER_HOOK 8

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
int zmqfork__slots_repair(void)
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
    void **slots[MAX_HOOKS * MAX_SLOTS_PER_HOOK];
    void *values[MAX_HOOKS * MAX_SLOTS_PER_HOOK];
    void *before[MAX_HOOKS * MAX_SLOTS_PER_HOOK];
    const char *symbols[MAX_HOOKS * MAX_SLOTS_PER_HOOK]; /* the symbol of each slot */
    size_t total = 0, used = 0, closers = 0;
    int creators = 0;
    const char *label = zmqfork__elf_name(elf);

    names[0] = '\0';
    for (size_t h = 0; h < zmqfork__nhooks && h < MAX_HOOKS; h++) { /* close first */
        size_t found = 0;
        int rc = zmqfork__elf_find(elf, zmqfork__hooks[h].name, &slots[total], MAX_SLOTS_PER_HOOK, &found);
        if (rc != ZMQFORK__ELF_OK)
            return fail(why, ZMQFORK_FDTRACK_EOBJECT, "cannot read the GOT of %s: %s", label,
                        zmqfork__elf_strerror(rc));
        if (found == 0)
            continue;
        for (size_t k = 0; k < found; k++) {
            values[total + k] = zmqfork__hooks[h].wrapper;
            symbols[total + k] = zmqfork__hooks[h].name;
        }
        total += found;
        if (zmqfork__hooks[h].closes)
            closers = total;
        else
            creators = 1;
        if (used < names_size) {
            int n = snprintf(names + used, names_size - used, "%s%s", used ? "," : "",
                             zmqfork__hooks[h].name);
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
    if (zmqfork__gate_installed())
        return ZMQFORK_FDTRACK_ON;
    int err = zmqfork__table_init();
    if (err != 0)
        return fail(why, ZMQFORK_FDTRACK_ENOMEM, "cannot map the descriptor table: %s",
                    strerror(err));
    zmqfork__gate_open();
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


void zmqfork_testing_fdtrack_fail_patch(unsigned int after_slots, void (*before_failing)(void))
{
    pthread_mutex_lock(&install_lock);
    zmqfork__elf_testing_fail_after(after_slots, before_failing);
    pthread_mutex_unlock(&install_lock);
}

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
