"""Child program of tests/test_descriptors.py (test_disabled_tracking_degrades); its result is the JSON on its last stdout line."""

import json, os, sys
import zmqfork
from forking import run_in_child

found = zmqfork.detection()
ctx = zmqfork.Context()
pull = ctx.socket(zmqfork.PULL)
port = pull.bind_to_random_port("tcp://127.0.0.1")
push = ctx.socket(zmqfork.PUSH)
push.connect("tcp://127.0.0.1:%d" % port)

def child():
    push.send(b"from the child")  # the inherited proxy rebuilds
    push.close(linger=10000)
    ctx.term()  # the child's own context: delivers before the child exits
    return zmqfork.detection().fdtrack

child_fdtrack = run_in_child(child, kind="os", timeout=30)
assert pull.poll(10000)
message = pull.recv()
ctx.destroy(linger=0)
print(json.dumps({"fdtrack": found.fdtrack, "why": found.unavailable.get("fdtrack"),
                  "object": found.fdtrack_object, "child_fdtrack": child_fdtrack,
                  "message": message.decode()}))
