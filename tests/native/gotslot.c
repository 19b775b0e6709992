/*
 * gotslot.c - the address of this object's GOT entry for close() (x86_64),
 * compiled with hooktarget.c and -fno-plt by tests/test_descriptors.py, so a
 * test can write that entry as the lazy binder or another library's hook
 * would, and see what zmqfork's fork handlers make of it.
 */
#include <unistd.h>

void **t_close_slot(void)
{
#if defined(__x86_64__)
    void **slot;
    __asm__("leaq close@GOTPCREL(%%rip), %0" : "=r"(slot));
    return slot;
#else
    return (void **)0;
#endif
}
