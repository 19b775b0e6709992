/*
 * mutexguard.c - pthread mutexes that a forked child gets back unlocked.
 *
 * Contract: a mutex registered with zmqfork_guard_recursive_mutex() is reset
 * to a fresh, unlocked recursive mutex in every child, by the atfork child handler or, after a
 * fork that skipped the handlers, by zmqfork_refresh() (then only if its holder
 * is not a thread of the child: the child may have started threads by then).  The child has only
 * the forking thread, so a lock held at fork time by any other thread belongs
 * to nobody, and a child that takes it would wait forever.
 *
 * Used for pyzmq's garbage-collector mutex, which freeing an inherited
 * zero-copy Frame takes.  The reset copies the bytes of a template mutex made
 * at registration: plain memory, async-signal-safe, no locks, no malloc.
 * The last GUARD_SLOTS registrations are kept (pyzmq makes a new mutex each
 * time its collector restarts, once per process that uses zero-copy sends).
 */
#define _GNU_SOURCE
#include "zmqfork.h"
#include "internal.h"

#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <sys/syscall.h>
#include <unistd.h>

#define GUARD_SLOTS 8

static pthread_mutex_t *guarded[GUARD_SLOTS];
static unsigned int registrations;
static pthread_mutex_t template_mutex;
static pthread_once_t template_once = PTHREAD_ONCE_INIT;
static int template_errno;

static int make_recursive(pthread_mutex_t *mutex)
{
    pthread_mutexattr_t attr;
    int rc = pthread_mutexattr_init(&attr);
    if (rc != 0)
        return rc;
    rc = pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_RECURSIVE);
    if (rc == 0)
        rc = pthread_mutex_init(mutex, &attr);
    pthread_mutexattr_destroy(&attr);
    return rc;
}

static void make_template(void)
{
    template_errno = make_recursive(&template_mutex);
}

/* Copies the template over *mutex byte by byte (no libc call). */
static void reset(pthread_mutex_t *mutex)
{
    const volatile unsigned char *from = (const volatile unsigned char *)&template_mutex;
    volatile unsigned char *to = (volatile unsigned char *)mutex;
    for (size_t i = 0; i < sizeof *mutex; i++)
        to[i] = from[i];
}

int zmqfork_guard_recursive_mutex(void *mutex)
{
    if (mutex == NULL)
        return EINVAL;
    pthread_once(&template_once, make_template);
    if (template_errno != 0)
        return template_errno;
    for (int i = 0; i < GUARD_SLOTS; i++)
        if (__atomic_load_n(&guarded[i], __ATOMIC_ACQUIRE) == mutex)
            return 0;
    /* Take the next slot, replacing the oldest registration when all are used. */
    unsigned int slot = __atomic_fetch_add(&registrations, 1, __ATOMIC_ACQ_REL) % GUARD_SLOTS;
    __atomic_store_n(&guarded[slot], (pthread_mutex_t *)mutex, __ATOMIC_RELEASE);
    return 0;
}

/*
 * Whether a mutex may be reset while other threads of this process may be
 * alive: only if it is held by a thread that is not one of them (one of the
 * parent's, which does not exist here).  glibc keeps the holder's thread id in
 * __data.__owner; tgkill() with signal 0 tells whether that thread is in this
 * process.  Elsewhere the holder is not known, and nothing is reset.
 */
static int held_by_a_stranger(pthread_mutex_t *mutex)
{
#if defined(__GLIBC__) && defined(__linux__)
    int owner = __atomic_load_n(&mutex->__data.__owner, __ATOMIC_SEQ_CST);
    if (owner == 0)
        return 0; /* unlocked */
    return syscall(SYS_tgkill, (long)getpid(), (long)owner, 0L) != 0 && errno == ESRCH;
#else
    (void)mutex;
    return 0;
#endif
}

void zmqfork__mutexguard_child(int deferred)
{
    int saved = errno;
    for (int i = 0; i < GUARD_SLOTS; i++) {
        pthread_mutex_t *mutex = __atomic_load_n(&guarded[i], __ATOMIC_ACQUIRE);
        if (mutex != NULL && (!deferred || held_by_a_stranger(mutex)))
            reset(mutex);
    }
    errno = saved;
}
