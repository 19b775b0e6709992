/* nothing.c - an object that imports no descriptor call (tests/test_descriptors.py). */
#include <unistd.h>
int nothing_pid(void) { return (int)getpid(); }
