/*
 * fakebackend.c - stands in for pyzmq's compiled backend: it only calls into
 * a fake libzmq.so.5 it is linked against (tests/test_descriptors.py).
 */
extern void *zmq_ctx_new(void);
extern int fake_make_fd(void);
extern int fake_close_fd(int fd);

__attribute__((visibility("default"))) void *backend_ctx_new(void) { return zmq_ctx_new(); }
__attribute__((visibility("default"))) int backend_make_fd(void) { return fake_make_fd(); }
__attribute__((visibility("default"))) int backend_close_fd(int fd) { return fake_close_fd(fd); }
