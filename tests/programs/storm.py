"""Child program of tests/test_descriptors.py (test_accept_storm_while_forking): connects to PORT in a loop from 4 threads until stdin closes, then prints the count."""

import socket, sys, threading
port = int(sys.argv[1])
stop = threading.Event()
made = [0] * 4

def run(slot):
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                made[slot] += 1
        except OSError:
            pass

threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
for t in threads:
    t.start()
while sum(made) < 20:  # the storm is on before the forks start
    threading.Event().wait(0.001)
sys.stdout.write("started\n"); sys.stdout.flush()
sys.stdin.read()  # until the test closes our stdin
stop.set()
for t in threads:
    t.join()
print(sum(made))
