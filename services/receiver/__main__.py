"""`python -m services.receiver`: the DICOM C-STORE SCP."""

from services.receiver.service import ReceiverService
from shared.runtime import run_service

if __name__ == "__main__":
    run_service(ReceiverService)
