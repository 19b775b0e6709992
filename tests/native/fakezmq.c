/*
 * fakezmq.c - stands in for libzmq when tests/test_descriptors.py checks how
 * zmqfork finds it: built as a "system libzmq.so.5" that a fake backend links
 * to, or compiled into the fake backend itself (static link), with
 * zmq_ctx_new exported or hidden (-DHIDE_ZMQ=1).
 */
#include <sys/eventfd.h>
#include <unistd.h>

#if HIDE_ZMQ
#define ZMQ_API __attribute__((visibility("hidden")))
#else
#define ZMQ_API __attribute__((visibility("default")))
#endif

ZMQ_API void *zmq_ctx_new(void)
{
    return (void *)0;
}

/* What the fake "context" does: one eventfd, closed with close(). */
__attribute__((visibility("default"))) int fake_make_fd(void)
{
    return eventfd(0, EFD_CLOEXEC);
}

__attribute__((visibility("default"))) int fake_close_fd(int fd)
{
    return close(fd);
}
