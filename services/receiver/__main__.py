"""`python -m services.receiver`: the DICOM C-STORE SCP."""

import sys

from services.receiver.memory import share_arenas
from services.receiver.service import ReceiverService
from services.receiver.workers import channel_fd, run_worker
from shared.runtime import run_service
from shared.settings import Settings

if __name__ == "__main__":
    # How long a thread waiting for the GIL waits at most while another runs Python (Python's
    # default: 5 ms). The association thread comes back from its journal fdatasync, or has the next
    # request to read, while the journal applier or the NATS loop holds the GIL: with 5 ms it waits
    # in a convoy. 0.5 ms: MR ingest 2.3-2.7 s instead of 3.3-3.9 s for 2000 images, CT not slower
    # (docs/performance.md, session 5).
    sys.setswitchinterval(Settings().receiver_switch_interval)
    share_arenas()  # what one association thread freed, the next one reuses (memory.py)
    fd = channel_fd()
    if fd is not None:
        run_worker(fd)  # one of the supervisor's worker processes (services/receiver/workers.py)
    else:
        run_service(ReceiverService)
