"""`python -m services.ui`"""

from services.ui.service import UiService
from shared.runtime import run_service

if __name__ == "__main__":
    run_service(UiService)
