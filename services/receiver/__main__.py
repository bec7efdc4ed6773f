"""`python -m services.receiver`: the DICOM C-STORE SCP."""

import os
import sys

from services.receiver.service import ReceiverService
from services.receiver.workers import channel_fd, run_worker
from shared.runtime import run_service

if __name__ == "__main__":
    # A thread waiting for the GIL (the blob writer, the DUL thread reading the next PDU) gets
    # it after at most this long while another thread runs Python code (default 5 ms).
    sys.setswitchinterval(float(os.environ.get("CADUCEUS_RECEIVER_SWITCH_INTERVAL", "0.0005")))
    fd = channel_fd()
    if fd is not None:
        run_worker(fd)  # one of the supervisor's worker processes (services/receiver/workers.py)
    else:
        run_service(ReceiverService)
