from services.processor.service import ProcessorService
from shared.runtime import run_service

run_service(ProcessorService)
