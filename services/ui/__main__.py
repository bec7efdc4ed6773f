from services.ui.service import UiService
from shared.runtime import run_service

run_service(UiService)
