"""Child program of tests/test_descriptors.py (test_got_patcher_relro_matrix); its result is the JSON on its last stdout line."""

import ctypes, errno, json, os, select, socket, stat, sys, time
from zmqfork import _native
from forking import fork_with, wait_child

path = sys.argv[1]
lib = ctypes.CDLL(path, use_errno=True)
lazy_first = sys.argv[2] == "call-first"
if lazy_first:  # resolve some slots lazily before the patch
    assert lib.t_close(-1) == -1

def maps():
    real = os.path.realpath(path)
    with open("/proc/self/maps") as handle:
        return [line.split()[:2] for line in handle if line.rstrip().endswith(real)]

before = maps()
assert _native.testing_fdtrack_hook_object(path) == _native.FDTRACK_ON
assert maps() == before, (before, maps())  # every page got its protection back
tracked = _native.fdtrack_is_tracked

def errno_after(fn, *args):
    lib.t_set_errno(4321)
    result = fn(*args)
    return result, lib.t_errno()

# Successes: tracked, errno untouched.
fd, err = errno_after(lib.t_socket, socket.AF_UNIX, socket.SOCK_STREAM, 0)
assert fd >= 0 and err == 4321 and tracked(fd)
assert errno_after(lib.t_close, fd) == (0, 4321) and not tracked(fd)
# Failures: the original's result and errno.
assert errno_after(lib.t_close, fd) == (-1, errno.EBADF)
assert errno_after(lib.t_socket, 12345, socket.SOCK_STREAM, 0) == (-1, errno.EAFNOSUPPORT)
assert errno_after(lib.t_eventfd, 0, -1) == (-1, errno.EINVAL)
assert errno_after(lib.t_dup, -1) == (-1, errno.EBADF)
assert errno_after(lib.t_epoll_create, 0) == (-1, errno.EINVAL)

efd = lib.t_eventfd(0, os.EFD_CLOEXEC); assert tracked(efd)
ep1 = lib.t_epoll_create1(0); assert tracked(ep1)
ep0 = lib.t_epoll_create(1); assert tracked(ep0)
pair = (ctypes.c_int * 2)()
assert lib.t_socketpair(socket.AF_UNIX, socket.SOCK_STREAM, pair) == 0 and tracked(pair[0]) and tracked(pair[1])
pipe = (ctypes.c_int * 2)()
assert lib.t_pipe(pipe) == 0 and tracked(pipe[0]) and tracked(pipe[1])
pipe2 = (ctypes.c_int * 2)()
assert lib.t_pipe2(pipe2, os.O_CLOEXEC) == 0 and tracked(pipe2[0]) and tracked(pipe2[1])
null = lib.t_open(b"/dev/null", os.O_RDONLY); assert tracked(null)
os.umask(0)
made = os.path.join(os.path.dirname(path), "made-%d" % os.getpid())
created = lib.t_open_mode(made.encode(), os.O_CREAT | os.O_WRONLY, 0o640)
assert tracked(created) and stat.S_IMODE(os.stat(made).st_mode) == 0o640  # the variadic mode got through

# accept/accept4 on a non-blocking listener: EAGAIN first, then a real connection.
listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.bind(("127.0.0.1", 0)); listener.listen(4); listener.setblocking(False)
assert errno_after(lib.t_accept4, listener.fileno(), 0) == (-1, errno.EAGAIN)
assert errno_after(lib.t_accept, listener.fileno()) == (-1, errno.EAGAIN)
clients = [socket.create_connection(listener.getsockname()) for _ in range(2)]
for _ in range(100):
    if select.select([listener], [], [], 0.1)[0]:
        break
accepted4 = lib.t_accept4(listener.fileno(), os.O_CLOEXEC); assert accepted4 >= 0 and tracked(accepted4)
select.select([listener], [], [], 5)
accepted = lib.t_accept(listener.fileno()); assert accepted >= 0 and tracked(accepted)
assert not tracked(listener.fileno()) and not any(tracked(c.fileno()) for c in clients)

# dup of an application descriptor makes a descriptor of the object's; dup2/dup3 onto a number make it theirs.
app_r, app_w = os.pipe()
assert not tracked(app_r)
copy = lib.t_dup(app_r); assert tracked(copy) and not tracked(app_r)
assert lib.t_dup2(efd, app_w) == app_w and tracked(app_w)     # app_w is now the object's eventfd
assert lib.t_dup2(app_r, app_r) == app_r and not tracked(app_r)  # dup2(fd, fd) changes nothing
spare = os.open("/dev/null", os.O_RDONLY); assert not tracked(spare)
assert lib.t_dup3(efd, spare, os.O_CLOEXEC) == spare and tracked(spare)
assert errno_after(lib.t_dup3, efd, efd, 0) == (-1, errno.EINVAL)

theirs = sorted({fd for fd in [efd, ep1, ep0, pair[0], pair[1], pipe[0], pipe[1], pipe2[0], pipe2[1],
                               null, created, accepted4, accepted, copy, app_w, spare]})
assert theirs == [fd for fd in _native.fdtrack_tracked_fds() if fd in theirs]
mine = [app_r, listener.fileno()] + [c.fileno() for c in clients]

# In a child, theirs are closed and mine are open.
rd, wr = os.pipe()
pid = fork_with("os")
if pid == 0:
    bad = [fd for fd in theirs if os.path.exists("/proc/self/fd/%d" % fd)]
    bad += [-fd for fd in mine if not os.path.exists("/proc/self/fd/%d" % fd)]
    os.write(wr, json.dumps(bad).encode())
    os._exit(0)
os.close(wr)
select.select([rd], [], [], 20)
child_bad = json.loads(os.read(rd, 65536) or b"null")
assert wait_child(pid, 20) == 0
print(json.dumps({"child_bad": child_bad, "closed_in_parent": [fd for fd in theirs if not os.path.exists("/proc/self/fd/%d" % fd)]}))
