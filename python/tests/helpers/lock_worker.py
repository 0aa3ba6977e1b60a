"""A separate process that uses session locks, for the tests of locks across processes.

python lock_worker.py SOCKET increment KEY TIMES   # TIMES read-modify-writes of a counter under the lock
python lock_worker.py SOCKET hold KEY              # take the lock, print "held FENCE", wait to be killed
"""

from __future__ import annotations

import sys
import threading

import scaled


def main() -> None:
    socket_path, mode, key = sys.argv[1], sys.argv[2], sys.argv[3]
    client = scaled.Client(socket_path, name=f"worker-{mode}")
    if mode == "increment":
        for _ in range(int(sys.argv[4])):
            with client.lock(key, ttl=30, wait=60) as lock:
                counter = client.get_json(f"{key}:counter") or 0
                client.set_json(f"{key}:counter", counter + 1, fence=lock)
    elif mode == "hold":
        lock = client.lock(key, ttl=600, wait=30)
        print(f"held {lock.fence}", flush=True)
        threading.Event().wait()  # until killed
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
