/*
 * closeloop.c - floors of a forked child's descriptor cleanup, for
 * benchmarks/forkcost.py, each over `count` descriptors and returning the
 * nanoseconds it took (CLOCK_MONOTONIC), or -1 if a call failed:
 *
 * close_loop:        close() on each, in a plain C loop: the floor of any cleanup;
 * check_close_loop:  the checks zmqfork's cleanup makes, without its table:
 *                    one fstat() per descriptor with a print (its inode
 *                    compared with `ino[i]`), one fcntl(F_GETSIG) per
 *                    anonymous-inode one (eventfd, epoll: `anonymous[i]`),
 *                    then one close_range() per run of consecutive numbers
 *                    (`fds` ascending).  The floor of a cleanup that must not
 *                    close a descriptor the application put at a number.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static long elapsed(const struct timespec *start)
{
    struct timespec end;
    clock_gettime(CLOCK_MONOTONIC, &end);
    return (end.tv_sec - start->tv_sec) * 1000000000L + (end.tv_nsec - start->tv_nsec);
}

long close_loop(const int *fds, int count)
{
    struct timespec start;
    int failed = 0;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (int i = 0; i < count; i++)
        failed |= close(fds[i]) != 0;
    long ns = elapsed(&start);
    return failed ? -1 : ns;
}

/* As zmqfork's close_run(): close_range() for a run, close() each where the kernel refuses it. */
static int close_numbers(int first, int count)
{
#ifdef SYS_close_range
    if (count > 1 && syscall(SYS_close_range, (unsigned int)first, (unsigned int)(first + count - 1), 0u) == 0)
        return 0;
#endif
    int failed = 0;
    for (int fd = first; fd < first + count; fd++)
        failed |= close(fd) != 0;
    return failed;
}

long check_close_loop(const int *fds, const unsigned char *anonymous, const uint64_t *ino, int count)
{
    struct timespec start;
    int failed = 0, run_first = 0, run_count = 0;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (int i = 0; i < count; i++) {
        struct stat st;
        if (anonymous[i])
            failed |= fcntl(fds[i], F_GETSIG) < 0;
        else
            failed |= fstat(fds[i], &st) != 0 || (uint64_t)st.st_ino != ino[i];
        if (run_count > 0 && fds[i] == run_first + run_count) {
            run_count++;
        } else {
            if (run_count > 0)
                failed |= close_numbers(run_first, run_count);
            run_first = fds[i];
            run_count = 1;
        }
    }
    if (run_count > 0)
        failed |= close_numbers(run_first, run_count);
    long ns = elapsed(&start);
    return failed ? -1 : ns;
}
