/*
 * closeloop.c - the floor of a forked child's descriptor cleanup, for
 * benchmarks/forkcost.py: close() on each of `count` descriptors in a plain C
 * loop.  Returns the nanoseconds the loop took (CLOCK_MONOTONIC), or -1 if a
 * close() failed.
 */
#include <time.h>
#include <unistd.h>

long close_loop(const int *fds, int count)
{
    struct timespec start, end;
    int failed = 0;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (int i = 0; i < count; i++)
        failed |= close(fds[i]) != 0;
    clock_gettime(CLOCK_MONOTONIC, &end);
    if (failed)
        return -1;
    return (end.tv_sec - start.tv_sec) * 1000000000L + (end.tv_nsec - start.tv_nsec);
}
