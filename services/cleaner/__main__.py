"""`python -m services.cleaner`"""

from services.cleaner.service import CleanerService
from shared.runtime import run_service

if __name__ == "__main__":
    run_service(CleanerService)
