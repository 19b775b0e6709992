/*
 * lazyresolve.c - a library that defines close() as an IFUNC whose resolver
 * can be made to wait, so that tests/test_descriptors.py can hold a thread
 * inside the dynamic linker's lazy resolver: after the symbol lookup, before
 * the resolver writes the GOT slot.  An object linked against it (before
 * libc) and loaded with RTLD_LAZY | RTLD_DEEPBIND binds its close() here.
 * Build it with -z now: the resolver's own calls must not need lazy binding.
 */
#define _GNU_SOURCE
#include <limits.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

static int armed;    /* the next resolution waits */
static int waiting;  /* a resolution is waiting now */
static int released; /* the waiting resolution may return */

static int plain_close(int fd)
{
    return (int)syscall(SYS_close, fd);
}

typedef int close_fn(int);

static close_fn *resolve_close(void)
{
    if (__atomic_exchange_n(&armed, 0, __ATOMIC_SEQ_CST)) {
        __atomic_store_n(&waiting, 1, __ATOMIC_SEQ_CST);
        while (!__atomic_load_n(&released, __ATOMIC_SEQ_CST))
            syscall(SYS_futex, &released, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
        __atomic_store_n(&waiting, 0, __ATOMIC_SEQ_CST);
    }
    return plain_close;
}

int close(int fd) __attribute__((ifunc("resolve_close")));

/* Makes the next lazy resolution of close() wait until lazy_release(). */
void lazy_arm(void)
{
    __atomic_store_n(&released, 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&armed, 1, __ATOMIC_SEQ_CST);
}

/* 1 while a resolution of close() waits inside the resolver. */
int lazy_waiting(void)
{
    return __atomic_load_n(&waiting, __ATOMIC_SEQ_CST);
}

void lazy_release(void)
{
    __atomic_store_n(&released, 1, __ATOMIC_SEQ_CST);
    syscall(SYS_futex, &released, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}
