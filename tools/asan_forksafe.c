/*
 * Preloaded after libasan by tools/sanitize.sh: makes AddressSanitizer's
 * allocator usable in the child of a multi-threaded fork().
 *
 * GCC 12's libasan replaces malloc but, unlike glibc's malloc, does not lock
 * its allocator around fork(): it has no fork interceptor and no atfork
 * handler.  A fork while another thread (a libzmq I/O thread) is inside
 * malloc or free copies that thread's allocator lock, held, into the child,
 * whose next allocation of that size class waits forever.  Newer
 * compiler-rt runtimes register an atfork handler that takes the thread
 * registry, allocator and stack depot locks before fork and releases them
 * after, in parent and child (see google/sanitizers#774); this file registers
 * such a handler for runtimes that lack it.  The lock functions are internal
 * to libasan (local symbols), so they are looked up in its .symtab.
 *
 * Not the stack depot: locking its million buckets takes 6-8 ms per fork and
 * dirties its whole 8 MB table (copied on write in parent and child).  A
 * prepare handler that slow is longer than CPython's 5 ms switch interval: a
 * Python thread waiting for the GIL then sets its drop request, the child of
 * a libc fork (made with the GIL held, no PyOS_AfterFork_Child) inherits it,
 * and the child's only thread waits in drop_gil for a thread that is not
 * there.  A bucket is locked only while a new stack trace is inserted, so
 * leaving it out costs a hang only if the child then inserts into that same
 * bucket of a million.
 *
 * os.fork() and libc fork() run atfork handlers; a raw clone syscall runs
 * none and stays unprotected (zmqfork._children waits for the other threads
 * to sleep before one).  If the runtime is not found or lacks a symbol, the
 * process says so on stderr and exits 70 rather than run unprotected.
 *
 * Built with -DASAN_FORKSAFE_SELFTEST this file is also a program that proves
 * the handler works: a thread holds the allocator lock across a fork, and the
 * child must still allocate (exit 0; 1 if the child hung and was killed).
 * With ASAN_FORKSAFE_SELFTEST_NO_HANDLER=1 in the environment it registers no
 * handler, to show the hang it prevents.
 */
#define _GNU_SOURCE
#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#ifdef ASAN_FORKSAFE_SELFTEST
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#endif

typedef void (*lock_fn)(void);

/* In LLVM's order (asan_posix.cpp, BeforeFork): threads, then allocator. */
static const char *const lock_names[] = {
    "_ZN6__lsan18LockThreadRegistryEv", /* __lsan::LockThreadRegistry() */
    "_ZN6__lsan13LockAllocatorEv",      /* __lsan::LockAllocator() */
};
static const char *const unlock_names[] = {
    "_ZN6__lsan20UnlockThreadRegistryEv",
    "_ZN6__lsan15UnlockAllocatorEv",
};
#define NLOCKS (sizeof lock_names / sizeof lock_names[0])

static lock_fn locks[NLOCKS];
static lock_fn unlocks[NLOCKS];

static void before_fork(void)
{
    for (size_t i = 0; i < NLOCKS; i++)
        locks[i]();
}

static void after_fork(void)
{
    for (size_t i = NLOCKS; i-- > 0;)
        unlocks[i]();
}

struct runtime {
    ElfW(Addr) base;
    char path[4096];
};

static int find_runtime(struct dl_phdr_info *info, size_t size, void *data)
{
    (void)size;
    struct runtime *rt = data;
    const char *slash = strrchr(info->dlpi_name, '/');
    const char *name = slash ? slash + 1 : info->dlpi_name;
    if (strncmp(name, "libasan.so", 10) != 0)
        return 0;
    rt->base = info->dlpi_addr;
    snprintf(rt->path, sizeof rt->path, "%s", info->dlpi_name);
    return 1;
}

static void fail(const char *what, const char *detail)
{
    fprintf(stderr, "asan_forksafe: %s%s%s; refusing to run with an allocator a fork can leave locked\n",
            what, detail ? ": " : "", detail ? detail : "");
    _exit(70);
}

/* Fills locks[] and unlocks[] from the runtime's symbol table. */
static void resolve(const struct runtime *rt)
{
    int fd = open(rt->path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0)
        fail("cannot open the ASan runtime", rt->path);
    const unsigned char *file = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (file == MAP_FAILED)
        fail("cannot map the ASan runtime", rt->path);
    const ElfW(Ehdr) *eh = (const ElfW(Ehdr) *)file;
    if ((size_t)st.st_size < sizeof *eh || memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0 ||
        eh->e_shoff == 0 || eh->e_shoff + (size_t)eh->e_shnum * sizeof(ElfW(Shdr)) > (size_t)st.st_size)
        fail("not an ELF file with section headers", rt->path);
    const ElfW(Shdr) *sh = (const ElfW(Shdr) *)(file + eh->e_shoff);
    for (size_t s = 0; s < eh->e_shnum; s++) {
        if (sh[s].sh_type != SHT_SYMTAB || sh[s].sh_link >= eh->e_shnum)
            continue;
        const ElfW(Sym) *sym = (const ElfW(Sym) *)(file + sh[s].sh_offset);
        const char *strtab = (const char *)(file + sh[sh[s].sh_link].sh_offset);
        size_t strsize = sh[sh[s].sh_link].sh_size;
        for (size_t k = 0; k < sh[s].sh_size / sizeof *sym; k++) {
            if (ELF64_ST_TYPE(sym[k].st_info) != STT_FUNC || sym[k].st_name >= strsize ||
                sym[k].st_value == 0)
                continue;
            const char *name = strtab + sym[k].st_name;
            for (size_t i = 0; i < NLOCKS; i++) {
                if (strcmp(name, lock_names[i]) == 0)
                    locks[i] = (lock_fn)(rt->base + sym[k].st_value);
                else if (strcmp(name, unlock_names[i]) == 0)
                    unlocks[i] = (lock_fn)(rt->base + sym[k].st_value);
            }
        }
    }
    munmap((void *)file, (size_t)st.st_size);
    for (size_t i = 0; i < NLOCKS; i++) {
        if (locks[i] == NULL)
            fail("symbol not in the ASan runtime's .symtab (stripped, or another version)", lock_names[i]);
        if (unlocks[i] == NULL)
            fail("symbol not in the ASan runtime's .symtab (stripped, or another version)", unlock_names[i]);
    }
}

__attribute__((constructor)) static void install(void)
{
    struct runtime rt = {0};
    if (!dl_iterate_phdr(find_runtime, &rt))
        fail("libasan is not loaded (preload it before this file)", NULL);
    resolve(&rt);
#ifdef ASAN_FORKSAFE_SELFTEST
    if (getenv("ASAN_FORKSAFE_SELFTEST_NO_HANDLER"))
        return;
#endif
    /* Registered before anything the program loads: its prepare handler runs
     * after theirs (which may still allocate) and its child handler first. */
    int err = pthread_atfork(before_fork, after_fork, after_fork);
    if (err != 0)
        fail("pthread_atfork failed", strerror(err));
}

#ifdef ASAN_FORKSAFE_SELFTEST
static pthread_mutex_t held_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t held_cond = PTHREAD_COND_INITIALIZER;
static int held;

/* Holds the allocator lock for a moment, as a thread inside malloc would. */
static void *hold_allocator(void *arg)
{
    (void)arg;
    locks[1]();
    pthread_mutex_lock(&held_mutex);
    held = 1;
    pthread_cond_signal(&held_cond);
    pthread_mutex_unlock(&held_mutex);
    struct timespec pause = {0, 200 * 1000 * 1000};
    nanosleep(&pause, NULL);
    unlocks[1]();
    return NULL;
}

int main(void)
{
    pthread_t thread;
    if (pthread_create(&thread, NULL, hold_allocator, NULL) != 0)
        return 2;
    pthread_mutex_lock(&held_mutex);
    while (!held)
        pthread_cond_wait(&held_cond, &held_mutex);
    pthread_mutex_unlock(&held_mutex);
    pid_t pid = fork(); /* while the other thread holds the allocator lock */
    if (pid == 0) {
        /* Fresh size classes: this thread's cache is empty, so each needs the allocator.
         * Through a volatile pointer: GCC removes a malloc whose block is only freed. */
        for (size_t size = 16; size <= (1u << 20); size *= 2) {
            void *volatile block = malloc(size);
            free(block);
        }
        _exit(0);
    }
    if (pid < 0)
        return 2;
    int status = 0;
    for (int waited_ms = 0; waitpid(pid, &status, WNOHANG) == 0; waited_ms++) {
        if (waited_ms == 5000) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            fprintf(stderr, "asan_forksafe selftest: the child of a fork made while the allocator "
                            "was locked hung in malloc (killed after 5 s)\n");
            pthread_join(thread, NULL);
            return 1;
        }
        struct timespec pause = {0, 1000 * 1000};
        nanosleep(&pause, NULL);
    }
    pthread_join(thread, NULL);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "asan_forksafe selftest: the child failed (wait status %d)\n", status);
        return 1;
    }
    return 0;
}
#endif
