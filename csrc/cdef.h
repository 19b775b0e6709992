/* The declarations cffi exposes to Python: a subset of zmqfork.h, kept in
 * step with it (tests/test_native.py checks that every name here is declared
 * there).  cffi reads this file; no C compiler includes it. */
#define ZMQFORK_MECH_ATFORK ...
#define ZMQFORK_MECH_WIPEONFORK ...
#define ZMQFORK_INIT_NO_ATFORK ...
#define ZMQFORK_INIT_NO_WIPEONFORK ...

int zmqfork_init(unsigned int flags);
volatile uint64_t *zmqfork_token(void);
uint64_t zmqfork_refresh(void);
unsigned int zmqfork_mechanisms(void);
int zmqfork_wipeonfork_errno(void);
int zmqfork_atfork_errno(void);
