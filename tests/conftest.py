import sys
from pathlib import Path

# helpers.py is shared by unit and integration tests.
sys.path.insert(0, str(Path(__file__).parent))
