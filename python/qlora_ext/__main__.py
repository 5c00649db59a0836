"""``python -m qlora_ext finetune ...``: the command line (qlora_ext/cli.py)."""

import sys

from .cli import main

sys.exit(main())
