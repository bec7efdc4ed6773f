from services.bookkeeper.service import BookkeeperService
from shared.runtime import run_service

if __name__ == "__main__":
    run_service(BookkeeperService)
