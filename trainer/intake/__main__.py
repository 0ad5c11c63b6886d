"""`python -m trainer.intake WORK_DIR/request.json`: the photo intake child process (trainer/intake/isolated.py)."""
import sys

from trainer.intake.isolated import main

sys.exit(main(sys.argv[1:]))
