from services.cleaner.service import CleanerService
from shared.runtime import run_service

run_service(CleanerService)
