/* noclose.c - an object that makes descriptors but never imports close():
 * zmqfork must refuse to track it (tests/test_descriptors.py). */
#include <sys/eventfd.h>
int noclose_make_fd(void) { return eventfd(0, 0); }
