/*
 * foreignclose.c - another library's close() hook that does not chain to the
 * value it replaced (an interposer that takes the real close from
 * dlsym(RTLD_NEXT)), installed over this object's close() GOT entry even in
 * a RELRO page.  Compiled with hooktarget.c and gotslot.c by
 * tests/test_descriptors.py: closes through it bypass zmqfork's wrapper.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <sys/mman.h>
#include <unistd.h>

void **t_close_slot(void);

static int (*real_close)(int);
static long foreign_calls;

static int foreign_close(int fd)
{
    foreign_calls++;
    return real_close(fd);
}

/* Writes foreign_close into the close() slot, making its page writable for
 * the store and read-only again after if it was RELRO.  0, or -1. */
int fc_install(void)
{
    void **slot = t_close_slot();
    real_close = (int (*)(int))dlsym(RTLD_NEXT, "close");
    if (slot == NULL || real_close == NULL)
        return -1;
    long page = sysconf(_SC_PAGESIZE);
    void *start = (void *)((uintptr_t)slot & ~((uintptr_t)page - 1));
    if (mprotect(start, (size_t)page, PROT_READ | PROT_WRITE) != 0)
        return -1;
    __atomic_store_n(slot, (void *)foreign_close, __ATOMIC_SEQ_CST);
    return mprotect(start, (size_t)page, PROT_READ);
}

long fc_calls(void)
{
    return foreign_calls;
}
