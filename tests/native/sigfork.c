/*
 * sigfork.c - forks from a signal handler, for tests/test_descriptors.py:
 * compiled together with hooktarget.c into one object whose GOT is hooked,
 * so that sf_close() is a hooked close() a test can park inside the gate
 * (zmqfork's testing delay) and interrupt with the signal.
 *
 * The handler forks with fork() (atfork handlers run), or with _Fork() (none
 * run: the child then catches up at once, through zmqfork_refresh(), before
 * the interrupted close() leaves), and returns.  In the parent it records the
 * child's pid.  The child finishes the interrupted
 * close(), then, in sf_close(), checks that its gate still works: it makes a
 * hooked eventfd, forks once more (the grandchild exits 0 iff that eventfd
 * was closed by the cleanup) and writes the outcome to the report pipe, then
 * exits without returning to Python.  An alarm, armed in the handler's child
 * branch and again in the epilogue, bounds every wait in the child.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <signal.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/wait.h>
#include <unistd.h>

static int report_fd = -1;
static int watched_fd = -1;
static void (*set_delay)(unsigned int);
static uint64_t (*refresh)(void); /* set for _Fork(): zmqfork_refresh */
static pid_t (*raw_fork)(void);
static volatile sig_atomic_t in_child;
static volatile sig_atomic_t child_pid;

static void on_signal(int signo)
{
    int saved = errno;
    (void)signo;
    pid_t pid = refresh != NULL ? raw_fork() : fork();
    if (pid == 0) {
        in_child = 1;
        alarm(20); /* a child stuck before the epilogue (in the gate) dies fast */
        if (refresh != NULL)
            refresh(); /* async-signal-safe */
    } else {
        child_pid = pid;
    }
    errno = saved;
}

/* Installs the handler for `signo`; the child reports to `fd`, and says
 * whether `watched` (a descriptor tracked before the fork) was closed in it.
 * `delay` is zmqfork_testing_fdtrack_delay, which the child turns off;
 * `refresh_fn`, zmqfork_refresh or NULL, chooses _Fork() over fork().
 * Returns -1 (errno ENOSYS) if _Fork() is wanted but this libc lacks it. */
int sf_install(int signo, int fd, int watched, void (*delay)(unsigned int),
               uint64_t (*refresh_fn)(void))
{
    if (refresh_fn != NULL) {
        raw_fork = (pid_t(*)(void))dlsym(RTLD_DEFAULT, "_Fork");
        if (raw_fork == NULL) {
            errno = ENOSYS;
            return -1;
        }
    }
    refresh = refresh_fn;
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_signal;
    sigemptyset(&action.sa_mask);
    report_fd = fd;
    watched_fd = watched;
    set_delay = delay;
    return sigaction(signo, &action, NULL);
}

int sf_child_pid(void)
{
    return child_pid;
}

/* The child's report: 'W' if the watched descriptor survived the cleanup,
 * 'E' if no eventfd could be made, 'F' if the second fork failed, 'S' if the
 * grandchild failed (its eventfd was not closed), 'K' if it ended otherwise,
 * else 'O'. */
static void child_epilogue(void)
{
    char verdict = 'O';
    alarm(20); /* re-armed: a hang in the gate below ends the child, and the parent sees it */
    set_delay(0);
    if (fcntl(watched_fd, F_GETFD) != -1)
        verdict = 'W';
    int made = eventfd(0, 0); /* hooked: tracked in this child */
    pid_t pid = made < 0 ? -1 : fork();
    if (made < 0) {
        verdict = 'E';
    } else if (pid == 0) {
        _exit(fcntl(made, F_GETFD) == -1 ? 0 : 1);
    } else if (pid < 0) {
        verdict = 'F';
    } else {
        int status = 0;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
        }
        if (!WIFEXITED(status))
            verdict = 'K';
        else if (WEXITSTATUS(status) != 0 && verdict == 'O')
            verdict = 'S';
    }
    while (write(report_fd, &verdict, 1) < 0 && errno == EINTR) {
    }
    _exit(0);
}

/* close() through this object's GOT; in a child made meanwhile, never returns. */
int sf_close(int fd)
{
    int rc = close(fd);
    if (in_child)
        child_epilogue();
    return rc;
}
