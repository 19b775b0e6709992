/*
 * cancelcall.c - a pthread that makes one hooked close() and is cancelled
 * inside it, for tests/test_descriptors.py (a Python thread cannot be
 * cancelled).  Compiled with hooktarget.c, whose t_close() is the hooked
 * call; zmqfork's testing delay makes the wrapper sleep in nanosleep(), a
 * cancellation point, inside the fork gate.
 */
#include <pthread.h>
#include <unistd.h>

int t_close(int fd);

static pthread_t thread;

static void *run(void *arg)
{
    t_close((int)(long)arg);
    return NULL;
}

/* Starts the thread; 0 or an errno value. */
int cc_start(int fd)
{
    return pthread_create(&thread, NULL, run, (void *)(long)fd);
}

/* Cancels it and waits for it: 1 if it ended by the cancellation, 0 if it
 * returned, -1 on error. */
int cc_cancel_and_join(void)
{
    void *result = NULL;
    if (pthread_cancel(thread) != 0 || pthread_join(thread, &result) != 0)
        return -1;
    return result == PTHREAD_CANCELED;
}
