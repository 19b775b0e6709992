/* The declarations cffi exposes to Python: a subset of zmqfork.h, kept in
 * step with it (tests/test_detection.py checks that every name here is declared
 * there).  cffi reads this file; no C compiler includes it. */
#define ZMQFORK_MECH_ATFORK ...
#define ZMQFORK_MECH_WIPEONFORK ...
#define ZMQFORK_INIT_NO_ATFORK ...
#define ZMQFORK_INIT_NO_WIPEONFORK ...
#define ZMQFORK_FDTRACK_ON ...
#define ZMQFORK_FDTRACK_ENOTINSTALLED ...
#define ZMQFORK_FDTRACK_ENOTLINUX ...
#define ZMQFORK_FDTRACK_EARCH ...
#define ZMQFORK_FDTRACK_ENOBACKEND ...
#define ZMQFORK_FDTRACK_EOBJECT ...
#define ZMQFORK_FDTRACK_ENOIMPORTS ...
#define ZMQFORK_FDTRACK_ENOMEM ...
#define ZMQFORK_FDTRACK_EPATCH ...

int zmqfork_init(unsigned int flags);
volatile uint64_t *zmqfork_token(void);
uint64_t zmqfork_refresh(void);
volatile uint8_t *zmqfork_noticed_flag(void);
unsigned int zmqfork_mechanisms(void);
int zmqfork_wipeonfork_errno(void);
int zmqfork_atfork_errno(void);

int zmqfork_fdtrack_install(const char *backend_path);
int zmqfork_fdtrack_status(void);
const char *zmqfork_fdtrack_reason(void);
const char *zmqfork_fdtrack_object(void);
const char *zmqfork_fdtrack_functions(void);
struct zmqfork_fdtrack_counts {
    long tracked;
    long closed_last;
    long closed_total;
    long untracked;
    long cleanup_ns;
};
void zmqfork_fdtrack_counts(struct zmqfork_fdtrack_counts *out);
int zmqfork_fdtrack_is_tracked(int fd);
int zmqfork_fdtrack_snapshot(int *fds, int max);
int zmqfork_guard_recursive_mutex(void *mutex);
int zmqfork_testing_fdtrack_hook_object(const char *path);
void zmqfork_testing_fdtrack_delay(unsigned int microseconds);
unsigned int zmqfork_testing_fdtrack_in_window(void);
void zmqfork_testing_fdtrack_table_size(unsigned int descriptors);
void zmqfork_testing_fdtrack_fail_patch(unsigned int after_slots, void (*before_failing)(void));
