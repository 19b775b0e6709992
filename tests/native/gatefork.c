/*
 * gatefork.c - a _Fork() from a signal handler on a thread waiting at the
 * closed gate, for tests/test_descriptors.py: compiled together with
 * hooktarget.c into one object whose GOT is hooked.
 *
 * The test parks one thread inside a hooked close() (zmqfork's testing
 * delay), lets a second thread fork (gf_fork_and_reap: its prepare handler
 * closes the gate and waits for the first), lets a third make a hooked call
 * (gf_close: it waits at the closed gate), and signals the third.  The
 * handler _Fork()s; in the child the interrupted call must leave its wait
 * (the token no longer matches the table), catch up, finish the close, and
 * gf_close then reports 'O' to the pipe and exits.  An alarm, armed in the
 * handler's child branch, ends a child that hangs instead.  Each thread
 * raises a flag just before its hooked call, so the test can tell that the
 * futex wait it sees in /proc is that call's.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static int report_fd = -1;
static void (*set_delay)(unsigned int);
static pid_t (*raw_fork)(void);
static volatile sig_atomic_t in_child;
static volatile sig_atomic_t child_pid;
static int forking; /* gf_fork_and_reap() is about to fork */
static int closing; /* gf_close() is about to close */

static void on_signal(int signo)
{
    int saved = errno;
    (void)signo;
    pid_t pid = raw_fork();
    if (pid == 0) {
        in_child = 1;
        alarm(10); /* a child stuck at the gate dies, and the parent sees it */
        set_delay(0);
    } else {
        child_pid = pid;
    }
    errno = saved;
}

/* Installs the handler for `signo`; the child reports to `fd`.  `delay` is
 * zmqfork_testing_fdtrack_delay, which the child turns off.  Returns -1
 * (errno ENOSYS) if this libc has no _Fork(). */
int gf_install(int signo, int fd, void (*delay)(unsigned int))
{
    raw_fork = (pid_t(*)(void))dlsym(RTLD_DEFAULT, "_Fork");
    if (raw_fork == NULL) {
        errno = ENOSYS;
        return -1;
    }
    report_fd = fd;
    set_delay = delay;
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_signal;
    action.sa_flags = SA_RESTART;
    sigemptyset(&action.sa_mask);
    return sigaction(signo, &action, NULL);
}

int gf_child_pid(void)
{
    return child_pid;
}

int gf_forking(void)
{
    return __atomic_load_n(&forking, __ATOMIC_SEQ_CST);
}

int gf_closing(void)
{
    return __atomic_load_n(&closing, __ATOMIC_SEQ_CST);
}

/* The number /proc/<pid>/task/<tid>/syscall shows for a futex wait. */
long gf_sys_futex(void)
{
    return SYS_futex;
}

/* fork() (atfork handlers run) and reap the child; returns 0, or -1. */
int gf_fork_and_reap(void)
{
    __atomic_store_n(&forking, 1, __ATOMIC_SEQ_CST);
    pid_t pid = fork();
    if (pid == 0)
        _exit(0);
    if (pid < 0)
        return -1;
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            return -1;
    return 0;
}

/* close() through this object's GOT; in a child made meanwhile, reports 'O'
 * and exits without returning to Python. */
int gf_close(int fd)
{
    __atomic_store_n(&closing, 1, __ATOMIC_SEQ_CST);
    int rc = close(fd);
    if (in_child) {
        char verdict = 'O';
        while (write(report_fd, &verdict, 1) < 0 && errno == EINTR) {
        }
        _exit(0);
    }
    return rc;
}
