import sys
from pathlib import Path

import torch

# Tests import the numpy references as a plain module.
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, torch.get_num_threads()))
