"""One Triton kernel launch at a time in this process."""
from __future__ import annotations

import threading

# Threads sharing a model launch kernels concurrently. Triton's interpreter (TRITON_INTERPRET=1) patches
# triton.language for the duration of a kernel, so two threads' interpreted kernels break each other (measured:
# 20 of 24 concurrent runs raised), and compiled Triton's first compile of a kernel from several threads at once is
# an open bug (triton-lang/triton#5933). A launch is a few microseconds of Python that holds the GIL anyway, so
# serialising launches costs next to nothing; the GPU work itself still overlaps.
LAUNCH_LOCK = threading.Lock()
