/* tools/sanitizer_canary.c's functions; also the cdef of the canary module (so: prototypes only). */
int canary_clean(size_t n);
int canary_heap_overflow(size_t n);
int canary_use_after_free(size_t n);
int canary_global_overflow(size_t i);
int canary_stack_overflow(size_t i);
int canary_shift_overflow(int bits);
