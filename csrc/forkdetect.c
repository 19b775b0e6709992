/*
 * forkdetect.c - fork detection: the token, the generation counter and the
 * pthread_atfork handlers.
 *
 * Contract: see zmqfork.h.  In short, zmqfork_token() points at a non-zero
 * token that changes in every child; zmqfork_refresh() repairs a token that a
 * fork without handlers wiped.  The handlers and zmqfork_refresh() touch plain
 * memory with lock-free atomics only (async-signal-safe, no malloc, no locks,
 * no Python), and preserve errno.
 *
 * Invariant: every token ever stored is a value freshly taken from
 * `generation`, which only grows; so no descendant can ever see a token one of
 * its ancestors had, whichever mechanism detected the fork.
 */
#define _GNU_SOURCE
#include "zmqfork.h"
#include "internal.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

/* The allocator of generations: ordinary memory, survives every fork. */
static uint64_t generation;

/* The token page (wiped on fork where supported) and its first word. */
static void *token_page;
static volatile uint64_t *token;
static size_t token_page_size;

static unsigned int mechanisms;
static int wipeonfork_errno = ENOSYS;
static int atfork_errno = ECANCELED;

/* The caller's byte (zmqfork_noticed_flag), right after the token in its page: cleared in every child. */
static volatile uint8_t *noticed_flag;

static pthread_once_t init_once = PTHREAD_ONCE_INIT;
static unsigned int init_flags;
static int init_result;

/* Takes a generation no process in this lineage has used yet. */
static uint64_t next_generation(void)
{
    return __atomic_add_fetch(&generation, 1, __ATOMIC_SEQ_CST);
}

static void on_prepare(void)
{
    int saved = errno;
    /* A process made by a fork that skipped the handlers and not caught up
     * yet inherited the gate as its parent's threads left it: catch up first,
     * or the prepare step would wait for calls no thread here will finish. */
    if (__atomic_load_n(token, __ATOMIC_SEQ_CST) == 0)
        zmqfork_refresh();
    zmqfork__fdtrack_prepare();
    errno = saved;
}

static void on_parent(void)
{
    int saved = errno;
    zmqfork__fdtrack_parent();
    errno = saved;
}

/* Clears the caller's flag, if one was given: a plain store. */
static void clear_noticed_flag(void)
{
    volatile uint8_t *flag = __atomic_load_n(&noticed_flag, __ATOMIC_SEQ_CST);
    if (flag != NULL)
        __atomic_store_n(flag, 0, __ATOMIC_SEQ_CST);
}

static void on_child(void)
{
    int saved = errno;
    /* Advance the generation first, then publish it as the token. */
    __atomic_store_n(token, next_generation(), __ATOMIC_SEQ_CST);
    clear_noticed_flag();
    zmqfork__mutexguard_child(0);
    zmqfork__fdtrack_child(0);
    errno = saved;
}

/*
 * Marks the token page wipe-on-fork, after checking that the kernel rejects a
 * nonsense advice value: some emulators accept any value and would otherwise
 * make us believe in a wipe that never happens.  Returns 0 or an errno value.
 */
static int arm_wipeonfork(void)
{
#if defined(__linux__) && defined(MADV_WIPEONFORK)
    const int invalid_advice = 0x7fff;
    if (madvise(token_page, token_page_size, invalid_advice) == 0)
        return EOPNOTSUPP;
    if (madvise(token_page, token_page_size, MADV_WIPEONFORK) != 0)
        return errno;
    return 0;
#else
    return ENOSYS;
#endif
}

static void init_once_body(void)
{
    int saved = errno;
    long page = sysconf(_SC_PAGESIZE);

    token_page_size = page > 0 ? (size_t)page : 4096;
    token_page = mmap(NULL, token_page_size, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (token_page == MAP_FAILED) {
        init_result = errno;
        token_page = NULL;
        errno = saved;
        return;
    }
    token = (volatile uint64_t *)token_page;
    noticed_flag = (volatile uint8_t *)token_page + sizeof(uint64_t);

    if (init_flags & ZMQFORK_INIT_NO_WIPEONFORK)
        wipeonfork_errno = ECANCELED;
    else
        wipeonfork_errno = arm_wipeonfork();
    if (wipeonfork_errno == 0)
        mechanisms |= ZMQFORK_MECH_WIPEONFORK;

    /* Publish the first token before any handler can run. */
    __atomic_store_n(token, next_generation(), __ATOMIC_SEQ_CST);

    if (init_flags & ZMQFORK_INIT_NO_ATFORK) {
        atfork_errno = ECANCELED;
    } else {
        atfork_errno = pthread_atfork(on_prepare, on_parent, on_child);
        if (atfork_errno == 0)
            mechanisms |= ZMQFORK_MECH_ATFORK;
    }
    errno = saved;
}

int zmqfork_init(unsigned int flags)
{
    init_flags = flags; /* read only by the single run of init_once_body */
    int rc = pthread_once(&init_once, init_once_body);
    return rc != 0 ? rc : init_result;
}

volatile uint64_t *zmqfork_token(void)
{
    return token;
}

uint64_t zmqfork_refresh(void)
{
    if (token == NULL)
        return 0; /* zmqfork_init() never succeeded */
    uint64_t current = __atomic_load_n(token, __ATOMIC_SEQ_CST);
    if (current != 0)
        return current;

    /* A fork skipped the handlers.  Advance the generation first, then try
     * to publish it; a thread that loses the race adopts the winner's. */
    int saved = errno;
    uint64_t expected = 0;
    uint64_t fresh = next_generation();
    if (__atomic_compare_exchange_n(token, &expected, fresh, 0,
                                    __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
        clear_noticed_flag();
        /* Deferred: the child's own code (threads too) may have run since. */
        zmqfork__mutexguard_child(1);
        zmqfork__fdtrack_child(1);
        current = fresh;
    } else {
        current = expected;
    }
    errno = saved;
    return current;
}

volatile uint8_t *zmqfork_noticed_flag(void)
{
    return noticed_flag;
}

unsigned int zmqfork_mechanisms(void)
{
    return mechanisms;
}

int zmqfork_wipeonfork_errno(void)
{
    return wipeonfork_errno;
}

int zmqfork_atfork_errno(void)
{
    return atfork_errno;
}
