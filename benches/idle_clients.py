"""Opens N logged-in idle client connections (trust auth) and prints the pooler's RSS growth
per connection. Usage: idle_clients.py HOST PORT USER DB N POOLER_PID RSS_BEFORE_KB"""
import resource
import selectors
import socket
import struct
import sys
import time

host, port, user, db, n, pid, before = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6], int(sys.argv[7])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, n + 1000)), hard))


def startup():
    body = struct.pack("!i", 196608) + b"user\0" + user.encode() + b"\0database\0" + db.encode() + b"\0\0"
    return struct.pack("!i", len(body) + 4) + body


sel = selectors.DefaultSelector()


def receive():
    """Reads what arrived; a connection is logged in once ReadyForQuery came."""
    for key, _ in sel.select(timeout=5):
        sock = key.fileobj
        data = sock.recv(65536)
        pending[sock] += data
        if b"Z\0\0\0\x05" in pending[sock] or not data:
            sel.unregister(sock)
            del pending[sock]


socks = []
pkt = startup()
pending = {}
for i in range(n):
    try:
        s = socket.create_connection((host, port), timeout=10)
    except OSError as e:
        print(f"stopped after {i} connections: {e}", file=sys.stderr)
        break
    s.setblocking(False)
    s.sendall(pkt)
    socks.append(s)
    sel.register(s, selectors.EVENT_READ)
    pending[s] = b""
    # Bound the in-flight logins so neither side queues thousands of handshakes at once.
    while len(pending) > 200:
        receive()
deadline = time.time() + 60
while pending and time.time() < deadline:
    receive()
time.sleep(2)
after = int(open(f"/proc/{pid}/status").read().split("VmRSS:")[1].split()[0])
ok = len(socks) - len(pending)
print(f"{(after - before) * 1024 / max(ok, 1):.0f} bytes ({ok} logged in, RSS {before} kB -> {after} kB)")
for s in socks:
    s.close()
