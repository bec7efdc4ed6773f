"""`python -m services.receiver`: the DICOM C-STORE SCP."""

import os
import sys

from services.receiver.service import ReceiverService
from services.receiver.workers import channel_fd, run_worker
from shared.runtime import run_service

if __name__ == "__main__":
    # Measurement knob: how long a thread waiting for the GIL (the blob staging thread, the DUL
    # thread) waits at most while another runs Python (Python's default: 5 ms). 0.5 ms showed no
    # gain beyond the noise on the shared test machine (docs/performance.md), so it is not set.
    if os.environ.get("CADUCEUS_RECEIVER_SWITCH_INTERVAL"):
        sys.setswitchinterval(float(os.environ["CADUCEUS_RECEIVER_SWITCH_INTERVAL"]))
    fd = channel_fd()
    if fd is not None:
        run_worker(fd)  # one of the supervisor's worker processes (services/receiver/workers.py)
    else:
        run_service(ReceiverService)
