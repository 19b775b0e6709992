/*
 * hooktarget.c - a shared object that makes every descriptor call zmqfork
 * hooks, built by tests/test_descriptors.py with each RELRO mode (none,
 * partial, full, -fno-plt) to prove the GOT patcher on each.  Each t_* function
 * makes exactly one call, so the test sees the hooked call's result and errno.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

int t_socket(int domain, int type, int protocol) { return socket(domain, type, protocol); }
int t_accept(int fd) { return accept(fd, NULL, NULL); }
int t_accept4(int fd, int flags) { return accept4(fd, NULL, NULL, flags); }
int t_eventfd(unsigned int value, int flags) { return eventfd(value, flags); }
int t_epoll_create1(int flags) { return epoll_create1(flags); }
int t_epoll_create(int size) { return epoll_create(size); }
int t_socketpair(int domain, int type, int fds[2]) { return socketpair(domain, type, 0, fds); }
int t_pipe(int fds[2]) { return pipe(fds); }
int t_pipe2(int fds[2], int flags) { return pipe2(fds, flags); }
int t_dup(int fd) { return dup(fd); }
int t_dup2(int fd, int target) { return dup2(fd, target); }
int t_dup3(int fd, int target, int flags) { return dup3(fd, target, flags); }
int t_open(const char *path, int flags) { return open(path, flags); }
int t_open_mode(const char *path, int flags, int mode) { return open(path, flags, (mode_t)mode); }
int t_close(int fd) { return close(fd); }
void t_set_errno(int value) { errno = value; }
int t_errno(void) { return errno; }

/* For timing: n calls of close(-1) (EBADF, no descriptor touched), n eventfd+close pairs. */
long t_loop_close_bad(long n)
{
    long failures = 0;
    for (long i = 0; i < n; i++)
        failures += close(-1) != 0;
    return failures;
}

long t_loop_eventfd_close(long n)
{
    long made = 0;
    for (long i = 0; i < n; i++) {
        int fd = eventfd(0, EFD_CLOEXEC);
        made += fd >= 0;
        close(fd);
    }
    return made;
}
