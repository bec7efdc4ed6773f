"""`python -m services.processor`"""

from services.processor.service import ProcessorService
from shared.runtime import run_service

if __name__ == "__main__":
    run_service(ProcessorService)
