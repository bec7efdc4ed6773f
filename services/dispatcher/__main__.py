"""`python -m services.dispatcher`: the DICOM C-STORE sender."""

from services.dispatcher.service import DispatcherService
from shared.runtime import run_service

if __name__ == "__main__":
    run_service(DispatcherService)
