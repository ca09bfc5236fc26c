"""How much this machine charges for touching memory, and whether freeing gives it back.

    python benchmarks/first_touch.py [GiB] [pause_s]

Touches GiB of fresh memory, again at once, then again after freeing it and waiting pause_s.
On a VM whose guest reports free pages to the host (virtio-balloon free page reporting), the
third touch costs as much as the first. Run it under bench.py's ``GLIBC_TUNABLES`` to see the
process keep its memory instead.
"""

import sys
import time

import numpy as np


def touch(nbytes: int) -> float:
    t = time.perf_counter()
    buf = np.empty(nbytes, np.uint8)
    buf[::4096] = 1
    dt = time.perf_counter() - t
    del buf
    return dt


def main() -> None:
    gib = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0
    pause = float(sys.argv[2]) if len(sys.argv) > 2 else 5.0
    n = int(gib * (1 << 30))
    print(f"first touch of {gib:g} GiB: {touch(n):.2f} s")
    print(f"again at once:         {touch(n):.2f} s")
    time.sleep(pause)
    print(f"again after {pause:g} s:     {touch(n):.2f} s")


if __name__ == "__main__":
    main()
