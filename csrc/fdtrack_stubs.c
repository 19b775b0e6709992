/*
 * fdtrack_stubs.c - descriptor tracking where it cannot work (no ELF GOT
 * patching: not Linux): every entry point of zmqfork.h, zmqfork_testing.h
 * and internal.h that the other fdtrack_*.c files define on Linux, doing
 * nothing; the install reports ZMQFORK_FDTRACK_ENOTLINUX with its reason.
 */
#include "zmqfork.h"
#include "zmqfork_testing.h"
#include "fdtrack.h"

#ifndef __linux__


void zmqfork__fdtrack_prepare(void) {}
void zmqfork__fdtrack_parent(void) {}
void zmqfork__fdtrack_child(int deferred) { (void)deferred; }

int zmqfork_fdtrack_install(const char *backend_path)
{
    (void)backend_path;
    zmqfork__fdtrack_publish(ZMQFORK_FDTRACK_ENOTLINUX,
                             "descriptor tracking needs Linux (ELF GOT patching)");
    return ZMQFORK_FDTRACK_ENOTLINUX;
}

int zmqfork_testing_fdtrack_hook_object(const char *path)
{
    (void)path;
    return ZMQFORK_FDTRACK_ENOTLINUX;
}

void zmqfork_testing_fdtrack_delay(unsigned int microseconds) { (void)microseconds; }
void zmqfork_testing_fdtrack_table_size(unsigned int descriptors) { (void)descriptors; }
unsigned int zmqfork_testing_fdtrack_in_window(void) { return 0; }
void zmqfork_testing_fdtrack_fail_patch(unsigned int after_slots, void (*before_failing)(void))
{
    (void)after_slots, (void)before_failing;
}

void zmqfork_fdtrack_counts(struct zmqfork_fdtrack_counts *out)
{
    *out = (struct zmqfork_fdtrack_counts){0, 0, 0, 0};
}
int zmqfork_fdtrack_is_tracked(int fd) { (void)fd; return 0; }
int zmqfork_fdtrack_snapshot(int *fds, int max) { (void)fds, (void)max; return 0; }


#endif /* !__linux__ */
