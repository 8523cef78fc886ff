"""`python -m finetune ...` (and `accelerate launch -m finetune ...`) is the `finetune` command."""

import sys

from finetune.cli import main

sys.exit(main())
