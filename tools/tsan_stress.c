/*
 * tsan_stress.c - drives zmqfork's C module, built with ThreadSanitizer, the
 * way a libzmq process does: worker threads make hooked calls (through
 * tests/native/hooktarget.c, hooked with zmqfork_testing_fdtrack_hook_object)
 * while forker threads fork by every kind: fork() (the atfork handlers run),
 * _Fork() and a raw clone syscall (they do not).  A child of fork() makes
 * hooked calls of its own, checks that the table holds only them, and exits;
 * a child of the other kinds exits at once (see raw_child()); the parent
 * checks every child's status.  Built and run by tools/tsan.sh, which fails on any TSan report.
 *
 *   tsan_stress HOOKTARGET.so [ROUNDS]    the stress run; exit 0 if every check passed
 *   tsan_stress --canary                  a deliberate data race TSan must report
 *
 * Contract: exit status 0 when every check passed (TSan reports are judged
 * by the script, from its log), 1 on a failed check, 2 on bad usage.
 */
#define _GNU_SOURCE
#include "zmqfork.h"
#include "zmqfork_testing.h"

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define WORKERS 3
#define FORKERS 2

static int (*t_eventfd)(unsigned int, int);
static int (*t_socket)(int, int, int);
static int (*t_pipe)(int[2]);
static int (*t_close)(int);
static int stop;
static int failures;

static void failed(const char *what)
{
    fprintf(stderr, "tsan_stress: %s\n", what);
    __atomic_add_fetch(&failures, 1, __ATOMIC_SEQ_CST);
}

/* One round of hooked calls: create three kinds of descriptors, close them. */
static int hooked_calls(void)
{
    int fds[2];
    int efd = t_eventfd(0, 0);
    int sock = t_socket(AF_UNIX, SOCK_STREAM, 0);
    int piped = t_pipe(fds);
    int ok = efd >= 0 && sock >= 0 && piped == 0;
    if (efd >= 0)
        t_close(efd);
    if (sock >= 0)
        t_close(sock);
    if (piped == 0) {
        t_close(fds[0]);
        t_close(fds[1]);
    }
    return ok;
}

static void *worker(void *arg)
{
    (void)arg;
    while (!__atomic_load_n(&stop, __ATOMIC_RELAXED))
        if (!hooked_calls())
            failed("a hooked call failed in the parent");
    return NULL;
}

/* In a child of fork(): its own descriptors are tracked, and only they. */
static void child_body(void)
{
    struct zmqfork_fdtrack_counts counts;
    int efd = t_eventfd(0, 0);
    zmqfork_fdtrack_counts(&counts);
    int ok = efd >= 0 && zmqfork_fdtrack_is_tracked(efd) && counts.tracked == 1;
    ok = ok && t_close(efd) == 0 && hooked_calls();
    _exit(ok ? 0 : 3);
}

/*
 * In a child of _Fork() or a raw clone: TSan's runtime did not see that fork,
 * so it still believes the parent's threads run here, and its own locks may
 * be held by one of them: any instrumented code could deadlock in the
 * runtime.  The child leaves at once through the raw syscall.  What these
 * forks exercise here is the parent's side: the memory a fork copies while
 * the other threads are inside hooked calls and while the forker threads'
 * handlers run.  The child's catch-up is single-threaded, and
 * tests/test_descriptors.py and tests/test_arch.py check it.
 */
static void raw_child(void)
{
    syscall(SYS_exit_group, 0L);
}

static pid_t fork_by(int kind)
{
    switch (kind) {
    case 0:
        return fork();
    case 1: {
        pid_t (*raw_fork)(void) = (pid_t(*)(void))dlsym(RTLD_DEFAULT, "_Fork");
        if (raw_fork != NULL)
            return raw_fork();
        return (pid_t)syscall(SYS_clone, (long)SIGCHLD, 0L, 0L, 0L, 0L); /* no _Fork here */
    }
    default:
        return (pid_t)syscall(SYS_clone, (long)SIGCHLD, 0L, 0L, 0L, 0L);
    }
}

static void *forker(void *arg)
{
    long rounds = (long)arg;
    for (long i = 0; i < rounds; i++) {
        int kind = (int)(i % 3);
        pid_t pid = fork_by(kind);
        if (pid == 0 && kind == 0)
            child_body();
        if (pid == 0)
            raw_child();
        if (pid < 0) {
            failed("fork failed");
            continue;
        }
        int status = 0;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
        }
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            fprintf(stderr, "tsan_stress: child of fork kind %d: wait status %d\n", kind, status);
            failed("a child failed its checks");
        }
    }
    return NULL;
}

/* The canary: two threads increment a plain int, a race TSan must report. */
static int canary_counter;

static void *canary_thread(void *arg)
{
    for (int i = 0; i < 1000; i++)
        canary_counter++;
    return arg;
}

static int canary(void)
{
    pthread_t a, b;
    pthread_create(&a, NULL, canary_thread, NULL);
    pthread_create(&b, NULL, canary_thread, NULL);
    pthread_join(a, NULL);
    pthread_join(b, NULL);
    printf("canary %d\n", canary_counter);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "--canary") == 0)
        return canary();
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: tsan_stress HOOKTARGET.so [ROUNDS] | --canary\n");
        return 2;
    }
    long rounds = argc == 3 ? strtol(argv[2], NULL, 10) : 60;
    if (zmqfork_init(0) != 0) {
        fprintf(stderr, "tsan_stress: zmqfork_init failed\n");
        return 1;
    }
    void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) {
        fprintf(stderr, "tsan_stress: %s\n", dlerror());
        return 1;
    }
    t_eventfd = (int (*)(unsigned int, int))dlsym(lib, "t_eventfd");
    t_socket = (int (*)(int, int, int))dlsym(lib, "t_socket");
    t_pipe = (int (*)(int[2]))dlsym(lib, "t_pipe");
    t_close = (int (*)(int))dlsym(lib, "t_close");
    if (!t_eventfd || !t_socket || !t_pipe || !t_close) {
        fprintf(stderr, "tsan_stress: %s lacks the t_* functions\n", argv[1]);
        return 1;
    }
    int rc = zmqfork_testing_fdtrack_hook_object(argv[1]);
    if (rc != ZMQFORK_FDTRACK_ON) {
        fprintf(stderr, "tsan_stress: hooking %s failed: %d\n", argv[1], rc);
        return 1;
    }
    pthread_t workers[WORKERS], forkers[FORKERS];
    for (int i = 0; i < WORKERS; i++)
        pthread_create(&workers[i], NULL, worker, NULL);
    for (int i = 0; i < FORKERS; i++)
        pthread_create(&forkers[i], NULL, forker, (void *)rounds);
    for (int i = 0; i < FORKERS; i++)
        pthread_join(forkers[i], NULL);
    __atomic_store_n(&stop, 1, __ATOMIC_RELAXED);
    for (int i = 0; i < WORKERS; i++)
        pthread_join(workers[i], NULL);
    struct zmqfork_fdtrack_counts counts;
    zmqfork_fdtrack_counts(&counts);
    if (counts.tracked != 0)
        failed("the parent's table is not empty after every descriptor was closed");
    printf("tsan_stress: %ld forks by each of %d threads, %d workers; untracked %ld\n", rounds,
           FORKERS, WORKERS, counts.untracked);
    return failures == 0 ? 0 : 1;
}
