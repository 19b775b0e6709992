/*
 * fdtrack_hooks.c - the wrappers patched into libzmq's GOT (each makes the
 * real call and updates the table inside the fork gate, and returns exactly
 * what the real call returned, with its errno), and descriptor tracking's
 * part of the fork handlers.  Contract: zmqfork.h, internal.h (handlers),
 * fdtrack.h (the overview).  The handlers are async-signal-safe and keep
 * errno.
 */
#define _GNU_SOURCE
#include "zmqfork.h"
#include "zmqfork_testing.h"
#include "fdtrack.h"

#ifdef __linux__

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* ---- testing: widen the race windows ------------------------------------ */

static unsigned int testing_delay_us; /* 0 in production: one load, one branch */
static unsigned int testing_in_window;

/* A pause's presence in the window: counted while it lasts, however it ends. */
struct window_stay {
    struct exit_guard guard;
    unsigned char counted;
};

static void testing_leave_window(struct window_stay *stay)
{
    if (stay->counted) {
        stay->counted = 0;
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        __atomic_sub_fetch(&testing_in_window, 1, __ATOMIC_SEQ_CST);
    }
}

static void testing_window_unwound(void *stay)
{
    guard_unwound(&((struct window_stay *)stay)->guard);
    testing_leave_window(stay);
}

static void testing_window_end(struct window_stay *stay)
{
    testing_leave_window(stay);
    guard_unlink(&stay->guard);
}

/* Sleeps inside the gate, between the real call and the table update; leaves
 * the window count also when a cancellation or a longjmp ends the sleep. */
static __attribute__((noinline, cold)) void testing_pause(void)
{
    int saved = errno;
    struct timespec pause = {
        .tv_sec = testing_delay_us / 1000000u,
        .tv_nsec = (long)(testing_delay_us % 1000000u) * 1000,
    };
    struct window_stay stay __attribute__((cleanup(testing_window_end))) = {.counted = 0};
    guard_link(&stay.guard, testing_window_unwound, &stay);
    __atomic_add_fetch(&testing_in_window, 1, __ATOMIC_SEQ_CST);
    stay.counted = 1;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    while (nanosleep(&pause, &pause) != 0 && errno == EINTR) {
    }
    errno = saved;
}

#define TESTING_WINDOW()                                                                    \
    do {                                                                                    \
        if (__builtin_expect(__atomic_load_n(&testing_delay_us, __ATOMIC_RELAXED) != 0, 0))  \
            testing_pause();                                                                \
    } while (0)

/* ---- the wrappers: the real call and the table update, inside the gate ---- */

/* The body of a wrapper whose call returns one new descriptor or -1;
 * `anonymous`: an eventfd or epoll descriptor. */
#define CREATE(call, anonymous)                                                             \
    PASS;                                                                                   \
    pass_enter(&pass_);                                                                     \
    int fd_ = (call);                                                                       \
    TESTING_WINDOW();                                                                       \
    zmqfork__track(fd_, (anonymous));                                                       \
    return fd_

static int hook_socket(int domain, int type, int protocol)
{
    CREATE(socket(domain, type, protocol), 0);
}

/* 1 if an accept on `fd` would wait for a client: no connection is pending
 * (on a non-blocking listener it would fail with EAGAIN at once). */
static int no_client_pending(int fd)
{
    int saved = errno;
    struct pollfd listener = {.fd = fd, .events = POLLIN, .revents = 0};
    int ready = poll(&listener, 1, 0);
    errno = saved;
    return ready == 0;
}

/*
 * libzmq accepts when epoll says a client is pending, on a listener that is
 * blocking (its own, or one handed over with ZMQ_USE_FD): the accept returns
 * at once, inside the gate like the other calls.  But another process sharing
 * the listener (prefork workers, socket activation) may take that client
 * first, and the accept then waits for the next one, for as long as it takes.
 * So an accept with no client pending runs outside the gate, where no fork
 * waits for it, and only the table update goes in.  If the client is taken
 * between the check and the accept, the wait happens inside the gate, and a
 * fork meanwhile waits the bound.
 */
#define ACCEPT(call, listener)                                                              \
    PASS;                                                                                   \
    TESTING_WINDOW(); /* lets a test take the client first */                               \
    if (__builtin_expect(no_client_pending(listener), 0))                                   \
        pass_outside(&pass_);                                                               \
    else                                                                                    \
        pass_enter(&pass_);                                                                 \
    int fd_ = (call);                                                                       \
    if (pass_.outside)                                                                      \
        pass_enter(&pass_);                                                                 \
    TESTING_WINDOW();                                                                       \
    zmqfork__track(fd_, 0);                                                                 \
    return fd_

static int hook_accept(int fd, struct sockaddr *addr, socklen_t *len)
{
    ACCEPT(accept(fd, addr, len), fd);
}

static int hook_accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
    ACCEPT(accept4(fd, addr, len, flags), fd);
}

static int hook_eventfd(unsigned int initval, int flags)
{
    CREATE(eventfd(initval, flags), 1);
}

static int hook_epoll_create1(int flags)
{
    CREATE(epoll_create1(flags), 1);
}

static int hook_epoll_create(int size)
{
    CREATE(epoll_create(size), 1);
}

static int hook_dup(int fd)
{
    CREATE(dup(fd), 0);
}

/* open's mode is read only when the flags say it was passed. */
static mode_t open_mode(int flags, va_list ap)
{
    if ((flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE)
        return (mode_t)va_arg(ap, int);
    return 0;
}

static int hook_open(const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = open_mode(flags, ap);
    va_end(ap);
    CREATE(open(path, flags, mode), 0);
}

#ifdef __GLIBC__
/* glibc's _FORTIFY_SOURCE entry points, which an object may import instead. */
extern int __open_2(const char *path, int flags);
extern int __open64_2(const char *path, int flags);

static int hook_open64(const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = open_mode(flags, ap);
    va_end(ap);
    CREATE(open64(path, flags, mode), 0);
}

static int hook_open_2(const char *path, int flags)
{
    CREATE(__open_2(path, flags), 0);
}

static int hook_open64_2(const char *path, int flags)
{
    CREATE(__open64_2(path, flags), 0);
}
#endif

static int hook_pair(int rc, const int fds[2])
{
    if (rc == 0) {
        zmqfork__track(fds[0], 0);
        zmqfork__track(fds[1], 0);
    }
    return rc;
}

static int hook_socketpair(int domain, int type, int protocol, int fds[2])
{
    PASS;
    pass_enter(&pass_);
    return hook_pair(socketpair(domain, type, protocol, fds), fds);
}

static int hook_pipe(int fds[2])
{
    PASS;
    pass_enter(&pass_);
    return hook_pair(pipe(fds), fds);
}

static int hook_pipe2(int fds[2], int flags)
{
    PASS;
    pass_enter(&pass_);
    return hook_pair(pipe2(fds, flags), fds);
}

/* dup2/dup3 onto a number makes that number libzmq's; dup2(fd, fd) changes nothing. */
static int hook_dup2(int fd, int target)
{
    PASS;
    pass_enter(&pass_);
    int rc = dup2(fd, target);
    if (rc >= 0 && fd != target)
        zmqfork__track(rc, 0);
    return rc;
}

static int hook_dup3(int fd, int target, int flags)
{
    PASS;
    pass_enter(&pass_);
    int rc = dup3(fd, target, flags);
    zmqfork__track(rc, 0);
    return rc;
}

static int hook_close(int fd)
{
    PASS;
    pass_enter(&pass_);
    zmqfork__untrack(fd); /* before the real close: the number may be reused at once */
    TESTING_WINDOW();
    return close(fd);
}

/* close comes first: the slots are patched in this order, and a descriptor
 * tracked while close was still unpatched could be closed untracked, leaving
 * a stale number a child would later close for someone else. */
const struct zmqfork__hook zmqfork__hooks[] = {
    {"close", (void *)hook_close, 1},
    {"socket", (void *)hook_socket, 0},
    {"accept", (void *)hook_accept, 0},
    {"accept4", (void *)hook_accept4, 0},
    {"eventfd", (void *)hook_eventfd, 0},
    {"epoll_create1", (void *)hook_epoll_create1, 0},
    {"epoll_create", (void *)hook_epoll_create, 0},
    {"socketpair", (void *)hook_socketpair, 0},
    {"pipe", (void *)hook_pipe, 0},
    {"pipe2", (void *)hook_pipe2, 0},
    {"dup", (void *)hook_dup, 0},
    {"dup2", (void *)hook_dup2, 0},
    {"dup3", (void *)hook_dup3, 0},
    {"open", (void *)hook_open, 0},
#ifdef __GLIBC__
    {"open64", (void *)hook_open64, 0},
    {"__open_2", (void *)hook_open_2, 0},
    {"__open64_2", (void *)hook_open64_2, 0},
#endif
};
const size_t zmqfork__nhooks = sizeof zmqfork__hooks / sizeof zmqfork__hooks[0];

/* ---- the fork handlers' part -------------------------------------------- */

void zmqfork__fdtrack_prepare(void)
{
    int saved = errno;
    if (zmqfork__gate_installed()) {
        zmqfork__gate_prepare();
        /* Repair here too, not only in the child, so the parent stops losing
         * descriptors to the plain functions. */
        if (zmqfork__slots_repair())
            zmqfork__table_forget();
    }
    errno = saved;
}

void zmqfork__fdtrack_parent(void)
{
    int saved = errno;
    if (zmqfork__gate_installed())
        zmqfork__gate_parent();
    errno = saved;
}

/*
 * The cleanup, once per process.  `deferred`: not inside the fork (a fork
 * that skipped the handlers), so the child's own code may have run since,
 * and every number is identified before it is closed (fdtrack_table.c).
 */
void zmqfork__fdtrack_child(int deferred)
{
    int saved = errno;
    if (!deferred)
        zmqfork__install_lock_reset();
    if (zmqfork__gate_installed() && zmqfork__gate_claim()) {
        pid_t owner = zmqfork__gate_owner();
        long in_flight = zmqfork__gate_reset();
        zmqfork__table_cleanup(deferred, deferred && getppid() == owner ? owner : 0, in_flight);
        zmqfork__gate_publish();
    }
    errno = saved;
}

void zmqfork_testing_fdtrack_delay(unsigned int microseconds)
{
    __atomic_store_n(&testing_delay_us, microseconds, __ATOMIC_RELAXED);
}

unsigned int zmqfork_testing_fdtrack_in_window(void)
{
    return __atomic_load_n(&testing_in_window, __ATOMIC_SEQ_CST);
}

#endif /* __linux__ */
