"""Child program of tests/test_descriptors.py (test_fork_chain_under_ulimit); its result is the JSON on its last stdout line."""

import ctypes, json, os, resource, struct, sys, time, traceback, warnings

generations = int(sys.argv[1])
warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*fork.*")
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER: orphans come back to us
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")

import zmqfork as zmq
from zmqfork._children import open_fds

ctx = zmq.Context()
pull = ctx.socket(zmq.PULL)
# ipc, not tcp: thousands of tcp connects to one port make the kernel's search
# for a free ephemeral port slow (TIME_WAIT); tcp descriptors are tested apart.
address = "ipc://" + os.path.join(sys.argv[2], "pull")
pull.bind(address)
start = time.monotonic()
if os.fork() == 0:
    inherited = [pull, ctx]
    gen = 1
    try:
        while True:
            for obj in inherited:  # drop what the parent made, without libzmq
                obj.close() if isinstance(obj, zmq.Socket) else obj.term()
            count = len(open_fds())
            c = zmq.Context()
            push = c.socket(zmq.PUSH)
            push.connect(address)
            push.send(struct.pack("!ii", gen, count))
            if gen < generations and os.fork() == 0:
                inherited = [push, c]
                gen += 1
                continue
            push.close(linger=20000)  # delivered before we go
            c.term()
            os._exit(0)
    except BaseException:
        traceback.print_exc()
        os._exit(1)

counts = {}
while len(counts) < generations and pull.poll(20000):
    gen, count = struct.unpack("!ii", pull.recv())
    counts[gen] = count
elapsed = time.monotonic() - start
failed = 0
deadline = time.monotonic() + 30
while time.monotonic() < deadline:  # reap every generation
    try:
        pid, status = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        break
    if pid == 0:
        time.sleep(0.005)
    elif status != 0:
        failed += 1
print(json.dumps({"counts": counts, "failed": failed, "elapsed": elapsed}))
