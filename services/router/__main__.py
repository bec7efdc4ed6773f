"""`python -m services.router`"""

from services.router.service import RouterService
from shared.runtime import run_service

if __name__ == "__main__":
    run_service(RouterService)
