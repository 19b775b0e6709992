/*
 * fdtrack.c - descriptor tracking's part of the fork handlers.
 *
 * Contract: see internal.h.  Not built yet: tracking is reported as off.
 */
#include "internal.h"

void zmqfork__fdtrack_prepare(void) {}
void zmqfork__fdtrack_parent(void) {}
void zmqfork__fdtrack_child(void) {}
