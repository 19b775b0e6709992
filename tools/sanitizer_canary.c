/*
 * Canaries for tools/sanitize.sh: each function but canary_clean makes one
 * real memory or undefined-behaviour error that the sanitizer build must
 * report.  The script builds this file into a throwaway cffi module with the
 * same flags as zmqfork's own C module and checks, on every run, that each
 * error is reported (and that canary_clean is not), before it trusts a clean
 * test run.
 *
 * Sizes and indexes come from the caller at run time, and every value read
 * is returned: an out-of-bounds access the compiler can see, or a store it
 * can prove dead (one just before free()), is folded away or caught by
 * UBSan's bounds checks before AddressSanitizer ever sees it.
 */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "sanitizer_canary.h"

/* No report: the same kinds of access, in bounds. */
int canary_clean(size_t n)
{
    char *block = malloc(n);
    if (block == NULL)
        return -1;
    memset(block, 1, n);
    int sum = block[n - 1];
    free(block);
    return sum;
}

/* heap-buffer-overflow: reads one byte past a malloc'd block of n bytes. */
int canary_heap_overflow(size_t n)
{
    char *block = malloc(n);
    if (block == NULL)
        return -1;
    memset(block, 1, n);
    int value = block[n];
    free(block);
    return value;
}

/* heap-use-after-free: reads a block after freeing it. */
int canary_use_after_free(size_t n)
{
    char *volatile block = malloc(n);
    if (block == NULL)
        return -1;
    memset(block, 1, n);
    free(block);
    return block[0];
}

/* global-buffer-overflow: reads a static array (like the module's tables) at index i. */
static char table[16] = "zmqfork canary";
static char *volatile table_at = table;

int canary_global_overflow(size_t i)
{
    return table_at[i];
}

/* stack-buffer-overflow: reads a local array (like the module's name buffers) at index i. */
int canary_stack_overflow(size_t i)
{
    char local[16];
    char *volatile at = local;
    memset(local, 1, sizeof local);
    return at[i];
}

/* UBSan: a shift by more than the width of int.  (Not signed overflow: Python's
 * CFLAGS, which every extension build inherits, include -fwrapv, which makes
 * that defined.) */
int canary_shift_overflow(int bits)
{
    return 1 << bits;
}
