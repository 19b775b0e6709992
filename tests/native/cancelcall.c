/*
 * cancelcall.c - a pthread that makes one hooked close() and is taken out of
 * it, for tests/test_descriptors.py (a Python thread can be neither cancelled
 * nor jumped out of a C call): cancelled, or interrupted by a signal whose
 * handler siglongjmp()s back to the thread's start.  Compiled with
 * hooktarget.c, whose t_close() is the hooked call; zmqfork's testing delay
 * makes the wrapper sleep in nanosleep() (a cancellation point, and
 * interruptible), inside the fork gate.
 */
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

int t_close(int fd);

#define JUMP_SIGNAL SIGUSR2

static pthread_t thread;
static sigjmp_buf jump_target;

static void jump_out(int sig)
{
    (void)sig;
    siglongjmp(jump_target, 1);
}

/* Returns (void *)1 if the handler jumped out of the close, NULL if it returned. */
static void *run(void *arg)
{
    if (sigsetjmp(jump_target, 1) != 0)
        return (void *)1;
    t_close((int)(long)arg);
    return NULL;
}

/* Installs the jumping handler (for cc_jump_and_join), then starts the
 * thread; 0 or an errno value. */
int cc_start(int fd)
{
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = jump_out;
    sigemptyset(&action.sa_mask);
    if (sigaction(JUMP_SIGNAL, &action, NULL) != 0)
        return -1;
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

/* Signals it (the handler jumps out of the close) and waits for it: 1 if it
 * came back by the jump, 0 if the close returned, -1 on error. */
int cc_jump_and_join(void)
{
    void *result = NULL;
    if (pthread_kill(thread, JUMP_SIGNAL) != 0 || pthread_join(thread, &result) != 0)
        return -1;
    return result == (void *)1;
}
